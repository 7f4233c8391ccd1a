"""Every federation message goes through here: the server and the leaders, over MPI.

A message is a `dict[str, Tensor]` (adapter weights, plus scalars such as the sample count)
packed into ONE contiguous byte buffer and moved with one MPI call. Both ends agree on the
layout (names, shapes, dtypes) once, at start-up (`Layout`), so payload messages carry no
metadata. The transport counts the bytes it sends and receives, per round and in total, and
can record every payload it sends (tests use that to prove the personal adapter never travels).

Federation ranks: 0 is the server, 1 + i is client i's leader.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TAG_LAYOUT = 10
TAG_GLOBAL = 11  # server -> leader: the global adapter for the coming round
TAG_UPDATE = 12  # leader -> server: the client's trained global adapter + sample count
TAG_PERSONAL_INIT = 13  # leader -> server: stage-1 personal adapter (global.init = personal_mean only)

KIND_BY_TAG = {TAG_GLOBAL: "global", TAG_UPDATE: "update", TAG_PERSONAL_INIT: "personal_init"}


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of a message's tensors, in packing order."""

    entries: tuple[tuple[str, tuple[int, ...], str], ...]

    @staticmethod
    def of(state: dict[str, torch.Tensor]) -> "Layout":
        return Layout(tuple((k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()))

    @property
    def nbytes(self) -> int:
        return sum(_numel(s) * _itemsize(d) for _, s, d in self.entries)

    def pack(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        if set(state) != {k for k, _, _ in self.entries}:
            raise ValueError(f"message keys {sorted(state)[:3]}... do not match the agreed layout")
        parts = []
        for k, shape, dtype in self.entries:
            t = state[k].detach().to("cpu")
            if tuple(t.shape) != shape or str(t.dtype).removeprefix("torch.") != dtype:
                raise ValueError(f"{k}: {tuple(t.shape)} {t.dtype} does not match the layout {shape} {dtype}")
            parts.append(t.contiguous().reshape(-1).view(torch.uint8))
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)

    def unpack(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        out, off = {}, 0
        for k, shape, dtype in self.entries:
            n = _numel(shape) * _itemsize(dtype)
            # clone first: a slice at an odd byte offset cannot be viewed as a wider dtype
            out[k] = buf[off:off + n].clone().view(getattr(torch, dtype)).reshape(shape)
            off += n
        return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: str) -> int:
    return torch.empty(0, dtype=getattr(torch, dtype)).element_size()


@dataclass
class Counters:
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0

    def snapshot(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Transport:
    """One end of the federation communicator (the server or a leader)."""

    comm: object  # mpi4py communicator of {server, leaders}
    total: Counters = field(default_factory=Counters)
    round: Counters = field(default_factory=Counters)
    record: list | None = None  # when a list, every sent payload is appended as (kind, dest, dict)

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    def new_round(self) -> None:
        self.round = Counters()

    def _count(self, sent: int = 0, received: int = 0) -> None:
        for c in (self.total, self.round):
            c.bytes_sent += sent
            c.bytes_received += received
            c.messages_sent += 1 if sent else 0
            c.messages_received += 1 if received else 0

    # -- layout handshake (pickled, once per run; counted like everything else) --

    def send_layout(self, layout: Layout, dest: int, tag: int = TAG_LAYOUT) -> None:
        import pickle

        self.comm.send(layout, dest=dest, tag=tag)
        self._count(sent=len(pickle.dumps(layout)))

    def recv_layout(self, source: int, tag: int = TAG_LAYOUT) -> Layout:
        import pickle

        layout = self.comm.recv(source=source, tag=tag)
        self._count(received=len(pickle.dumps(layout)))
        return layout

    # -- payloads: one buffer, one MPI call --

    def send(self, state: dict[str, torch.Tensor], layout: Layout, dest: int, tag: int) -> None:
        from mpi4py import MPI

        buf = layout.pack(state).numpy()
        if self.record is not None:
            self.record.append((KIND_BY_TAG.get(tag, str(tag)), dest, {k: v.detach().clone() for k, v in state.items()}))
        self.comm.Send([buf, MPI.BYTE], dest=dest, tag=tag)
        self._count(sent=buf.nbytes)

    def recv(self, layout: Layout, source: int, tag: int) -> dict[str, torch.Tensor]:
        from mpi4py import MPI

        buf = torch.empty(layout.nbytes, dtype=torch.uint8)
        self.comm.Recv([buf.numpy(), MPI.BYTE], source=source, tag=tag)
        self._count(received=layout.nbytes)
        return layout.unpack(buf)

    def send_to_all(self, state: dict[str, torch.Tensor], layout: Layout, dests: list[int], tag: int) -> None:
        for d in dests:
            self.send(state, layout, d, tag)

    def recv_from_all(self, layout: Layout, sources: list[int], tag: int) -> dict[int, dict[str, torch.Tensor]]:
        return {s: self.recv(layout, s, tag) for s in sources}
