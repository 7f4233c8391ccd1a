"""The federation protocol's one home: every message between the server and the leaders, over MPI.

    leader -> server   layout      the global adapter's names, shapes, dtypes (pickled, once, every
                                   leader); the server refuses layouts that differ between clients
                                   other than in the LoRA rank, and sizes each client's messages by
                                   its own (global.combine = frozen_a: B alone travels)
    leader -> server   init        the start the server cannot compute: client 0's seeded global
                                   adapter (global.init = seed), or every client's stage-1 personal
                                   adapter (global.init = personal_mean, the paper's line 7)
    server -> leader   global      GlobalAdapter(round t, state): the adapter round t starts from;
                                   round = rounds + 1 (`final`) is the one the clients keep. The
                                   header's count field (num_samples) says whether that leader's
                                   update of round t - 1 was averaged (1) or not (0: missing, late,
                                   rejected, or the round skipped)
    leader -> server   update      ClientUpdate(round t, client, num_samples, state, loss)
    leader -> server   bye         after the final global: nothing more comes from this leader
    server -> leader   abort       instead of a global: the job stops, with the server's reason

The server always keeps one receive posted per leader (`post_receives`, `next_update`), so a
leader's send never blocks on it, and it takes updates in the order they arrive, until a round's
deadline (federation.round_timeout_s). Every message carries its round, so a late update (from an
earlier round) is recognised and dropped; a leader that fell behind takes only the newest global
adapter waiting for it (`recv_newest_global`) and goes on from there. After the final global the
server drains each leader until its `bye`, so no message is left in flight. The server starts the
sends of a global adapter and does not wait for them (`outbox`): a leader still in an earlier
round takes its copy when it gets there, so the round's deadline runs from the send for everyone.

A message is ONE contiguous byte buffer moved with one MPI call: a 40-byte header (kind, round,
client, num_samples, loss) and the adapter packed by its `Layout` (or the abort reason as UTF-8). Both
ends agree on the layout once, at start-up, so adapter messages carry no other metadata, and
every receive checks its byte count and kind against it. `Layout` also packs the leader's
broadcast inside its client (engine.broadcast_from_leader). The transport counts the bytes it
moves, per round and in total, and can record every payload it sends (tests use that to prove
the personal adapter never travels). Peers are named by client id; `RankPlan` maps them to
federation ranks.

With `federation.compress` (bf16, int8: compress.py) a global adapter after the first travels as
its change to the previous one (`global_c`, `final_c`) and an update as its change to the round's
global adapter (`update_c`), encoded, with error feedback; both ends keep the global adapter as
the leaders decode it (`reference`), so the server and every rank hold the same one bit for bit.
Clients of different global ranks each get their own stream (`references`, `residuals` per client
at the server). A leader's residual after an update is kept only once the next global adapter says that update
was averaged (`_settle`): a dropped update's rounding error is dropped with it, never added to the
next, unrelated update (and a non-finite one cannot poison every later update of its client).

Every wait on the federation yields the CPU (`waits.wait_for`): a non-blocking receive or probe tested
with a growing sleep in between, never MPI's blocking receive, which under MPICH spins on a core
for as long as it waits (the server for a whole round, a leader while the other clients train).
`yielding_barrier` does the same for the ranks that wait inside a client or at the job's end.
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass, field

import torch

from .state import Layout, add, sub
from .strategies.combine import b_keys
from .waits import wait_for

TAG_LAYOUT = 10
TAG_TO_LEADER = 11  # global, final, abort
TAG_TO_SERVER = 12  # init, update

KINDS = ("init", "global", "final", "update", "abort", "bye", "global_c", "final_c", "update_c")
# *_c: a compressed change to the reference adapter instead of the adapter (federation.compress)
HEADER = struct.Struct("<qqqdd")  # kind, round, client, num_samples, loss (an update's; NaN in the others)


class TransportError(RuntimeError):
    """A message that does not fit the protocol: wrong size, kind or layout. Names the peer."""


class FederationAborted(RuntimeError):
    """The server stopped the job and said why (raised on the leaders)."""


@dataclass
class GlobalAdapter:
    """server -> leaders: the global adapter round `round` starts from (`final`: the last one)."""

    round: int
    state: dict[str, torch.Tensor]
    final: bool = False
    skipped: list[int] = field(default_factory=list)  # older rounds' globals the leader passed over
    used: list[int] = field(default_factory=list)
    """Server side: the clients whose update of the previous round was averaged (each leader is
    told whether it is one of them, `Transport._settle`)."""


@dataclass
class ClientUpdate:
    """leader -> server: the client's global adapter after round `round`, and its weight."""

    round: int
    client: int
    num_samples: float
    state: dict[str, torch.Tensor]
    loss: float = float("nan")
    """The leader's mean training loss over the round's steps (NaN when it took none): one number
    per client per round, for the server's progress line and metrics; no data row travels."""


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
    """One end of the federation communicator (the server or a leader). Peers are client ids."""

    comm: object  # mpi4py communicator of {server, leaders}
    plan: object  # topology.RankPlan: client id <-> federation rank
    total: Counters = field(default_factory=Counters)
    round: Counters = field(default_factory=Counters)
    record: list | None = None
    """The payload tap (tests): when a list, every message this end sends is appended as
    (kind, dest, state or None, num_samples, the bytes on the wire)."""
    layout: Layout | None = None  # the global adapter's messages', agreed at the handshake
    layouts: dict = field(default_factory=dict)
    """server: client -> its messages' layout (clients' global adapters may differ in rank)."""
    full_layouts: dict = field(default_factory=dict)  # server: client -> its whole global adapter's layout
    full_layout: Layout | None = None  # leader: its whole global adapter's layout
    b_only: bool = False
    """global.combine = frozen_a: the global adapter's A never changes, so messages carry B alone
    (the start-up `init` still carries the whole adapter, once)."""
    inbox: dict = field(default_factory=dict)  # server: client -> (buffer, posted MPI receive)
    outbox: list = field(default_factory=list)
    """Server: the global adapters sent and not yet taken, (request, buffer): a leader still in an
    earlier round takes its own when it gets there; nobody waits for it (`send_global`, `flush`)."""
    codec: object | None = None
    """compress.Codec when federation.compress is on. Then every global adapter after the first
    travels as its change to the previous one, and every update as its change to the round's
    global adapter, encoded; `reference` is the global adapter both ends hold (the server's as the
    leaders decode it), `residual` this end's error feedback (what its last encoding lost)."""
    reference: dict | None = None
    residual: dict | None = None
    references: dict = field(default_factory=dict)
    residuals: dict = field(default_factory=dict)
    """Server, when clients hold global adapters of different ranks (each its own top-r_k part):
    client -> `reference` and `residual` of that client's stream, as above."""
    pending: tuple | None = None
    """A leader: (round, residual) of its last update until the next global adapter says whether
    that update was averaged; only then does its residual replace `residual` (`_settle`)."""

    @property
    def wire_layout(self) -> Layout:
        """The layout of a compressed message (the codec's tensors for the global adapter's)."""
        return self.wire_layout_of(self.layout)

    def wire_layout_of(self, layout: Layout) -> Layout:
        return Layout(self.codec.wire_entries(layout.entries))

    def reference_of(self, client: int) -> dict | None:
        """The global adapter `client` holds as both ends decode it (server side)."""
        return self.references.get(client, self.reference)

    def _encode_change(self, change: dict, residual: dict | None) -> tuple[dict, dict, dict]:
        """(wire tensors, their decoding, the new residual) of `change` plus `residual`; the new
        residual is what encoding lost (the caller decides when it replaces the old one)."""
        if residual is not None:
            change = add(change, residual)
        wire = self.codec.encode(change)
        decoded = self.codec.decode(wire, change)
        return wire, decoded, sub(change, decoded)

    def _settle(self, round: int, used: bool) -> None:
        """A leader learns from the global adapter of `round` whether its update of `round - 1` was
        averaged: if so, that update's rounding error is carried to the next one; if not (missing,
        late, rejected, skipped round) the error is dropped with the update, and the residual
        stays what it was before it."""
        if self.pending is not None and self.pending[0] == round - 1:
            if used:
                self.residual = self.pending[1]
            self.pending = None

    def _decode_change(self, body: torch.Tensor, reference: dict, layout: Layout) -> dict:
        """`reference` with the change in `body` applied (it becomes the new reference when a global
        adapter came; an update's is the server's reference of that client plus the change)."""
        return add(reference, self.codec.decode(self.wire_layout_of(layout).unpack(body), reference))

    def codec_state(self) -> dict | None:
        """What compression carries from round to round at this end (a checkpoint's part): the
        reference adapter and the error-feedback residual. Both are replaced, never changed in
        place, so the dicts returned stay as they are when the transport goes on. A leader's
        `pending` residual (its last update's, not yet known to count) goes with them."""
        if self.codec is None:
            return None
        return {"reference": self.reference, "residual": self.residual, "pending": self.pending,
                "references": dict(self.references), "residuals": dict(self.residuals)}

    def load_codec_state(self, state: dict | None) -> None:
        """A resumed end goes on with the checkpoint's reference and residual, so that what it
        sends next is encoded as it would have been without the stop. None (no compression, or a
        checkpoint from before compression state was kept): the first global travels whole."""
        if self.codec is not None and state is not None:
            self.reference, self.residual = state["reference"], state["residual"]
            self.pending = state.get("pending")  # absent in checkpoints made before it was kept
            self.references, self.residuals = dict(state.get("references", {})), dict(state.get("residuals", {}))

    def new_round(self) -> None:
        self.round = Counters()

    def _count(self, sent: int = 0, received: int = 0) -> None:
        for c in (self.total, self.round):
            c.bytes_sent += sent
            c.bytes_received += received
            c.messages_sent += 1 if sent else 0
            c.messages_received += 1 if received else 0

    # -- the wire: header + payload in one buffer, one MPI call --

    def _send(self, kind: str, dest: int, tag: int, state=None, round: int = 0, client: int = -1,
              num_samples: float = 0.0, loss: float = float("nan"), text: str = "", layout: Layout | None = None):
        """Start sending one message; returns (request, buffer). A large message completes only once
        the peer has posted its receive; the callers wait for it with `wait_for`, not spinning."""
        from mpi4py import MPI

        head = torch.frombuffer(bytearray(HEADER.pack(KINDS.index(kind), round, client, num_samples, loss)), dtype=torch.uint8)
        body = (layout or self.layout).pack(state) if state is not None else torch.frombuffer(bytearray(text.encode() or b" "),
                                                                                  dtype=torch.uint8)
        buf = torch.cat([head, body]).numpy()
        if self.record is not None:
            self.record.append((kind, dest, None if state is None else {k: v.detach().clone() for k, v in state.items()},
                                num_samples, buf.tobytes()))
        request = self.comm.Isend([buf, MPI.BYTE], dest=dest, tag=tag)
        self._count(sent=buf.nbytes)
        return request, buf  # the buffer must live until the request completes

    def _recv(self, source: int, tag: int, peer: str) -> tuple[str, int, int, float, float, torch.Tensor]:
        """(kind, round, client, num_samples, loss, body) of the next message from `source`; the byte
        count must be the layout's (an abort may be shorter: its reason is text)."""
        from mpi4py import MPI

        buf = torch.empty(HEADER.size + max(self.layout.nbytes, 4096), dtype=torch.uint8)
        status = MPI.Status()
        request = self.comm.Irecv([buf.numpy(), MPI.BYTE], source=source, tag=tag)
        wait_for(lambda: request.Test(status))
        return self._decode(buf, status.Get_count(MPI.BYTE), peer)

    def _send_all(self, messages) -> None:
        """Send (kind, dest, tag, kwargs) messages at once and wait, yielding, until all are out: a
        leader still busy (training its personal adapter, or late) delays only its own message."""
        from mpi4py import MPI

        pending = [self._send(kind, dest, tag, **kw) for kind, dest, tag, kw in messages]
        requests = [r for r, _ in pending]
        wait_for(lambda: MPI.Request.Testall(requests))

    def layout_of(self, client: int) -> Layout:
        """The layout of `client`'s messages (the server's per-client one; a leader has its own)."""
        return self.layouts.get(client, self.layout)

    def _message_layout(self, layout: Layout) -> Layout:
        return layout.only(b_keys(k for k, _, _ in layout.entries)) if self.b_only else layout

    def _decode(self, buf: torch.Tensor, n: int, peer: str,
                layout: Layout | None = None) -> tuple[str, int, int, float, float, torch.Tensor]:
        """Count and check a received message of `n` bytes in `buf`: a known kind, and an adapter
        message's byte count equal to the layout's (abort and bye carry text; `layout`: the
        sender's, default this end's)."""
        layout = layout or self.layout
        self._count(received=n)
        if n < HEADER.size:
            raise TransportError(f"{peer}: a message of {n} bytes, shorter than the {HEADER.size}-byte header")
        kind_i, round, client, num_samples, loss = HEADER.unpack(buf[:HEADER.size].numpy().tobytes())
        if not 0 <= kind_i < len(KINDS):
            raise TransportError(f"{peer}: unknown message kind {kind_i}")
        kind, body = KINDS[kind_i], buf[HEADER.size:n]
        if kind.endswith("_c"):
            if self.codec is None or (self.reference is None and not self.references):
                raise TransportError(f"{peer}: a compressed {kind} message, but this end "
                                     + ("has compression off" if self.codec is None else "holds no global adapter yet"))
            wire = self.wire_layout_of(layout)
            if body.numel() != wire.nbytes:
                raise TransportError(f"{peer}: a {kind} message of {body.numel()} bytes, but the compressed layout "
                                     f"holds {wire.nbytes}")
        elif kind not in ("abort", "bye") and body.numel() != layout.nbytes:
            raise TransportError(f"{peer}: a {kind} message of {body.numel()} bytes, but the agreed layout of the "
                                 f"global adapter holds {layout.nbytes}")
        return kind, round, client, num_samples, loss, body

    # -- leader side --

    def send_layout(self, layout: Layout) -> None:
        """Every leader, once: the server checks that all clients carry the same global adapter
        (up to its rank)."""
        self.full_layout, self.layout = layout, self._message_layout(layout)
        self.comm.send(layout, dest=0, tag=TAG_LAYOUT)
        wire = pickle.dumps(layout)
        if self.record is not None:
            self.record.append(("layout", 0, None, 0.0, wire))
        self._count(sent=len(wire))

    def send_init(self, client: int, state: dict[str, torch.Tensor]) -> None:
        """The whole adapter (A too under frozen_a: the server saves it with the final B)."""
        request, _buf = self._send("init", 0, TAG_TO_SERVER, state, client=client, layout=self.full_layout)
        wait_for(request.Test)

    def send_update(self, update: ClientUpdate) -> None:
        """The update, or with compression its change to the round's global adapter, encoded."""
        kind, state, layout = "update", update.state, None
        if self.codec is not None and self.reference is not None:
            wire, _, residual = self._encode_change(sub(update.state, self.reference), self.residual)
            self.pending = (update.round, residual)  # kept once the server says the update counted
            kind, state, layout = "update_c", wire, self.wire_layout
        request, _buf = self._send(kind, 0, TAG_TO_SERVER, state, round=update.round, client=update.client,
                                   num_samples=update.num_samples, loss=update.loss, layout=layout)
        wait_for(request.Test)

    def recv_global(self) -> GlobalAdapter:
        kind, round, _, used, _, body = self._recv(0, TAG_TO_LEADER, "the server")
        if kind == "abort":
            raise FederationAborted(f"the server stopped the job: {bytes(body.numpy()).decode(errors='replace')}")
        if kind not in ("global", "final", "global_c", "final_c"):
            raise TransportError(f"the server sent a {kind} message where a global adapter was due")
        if kind.endswith("_c"):
            self.reference = self._decode_change(body, self.reference, self.layout)
            state = {k: v.clone() for k, v in self.reference.items()}
        else:
            state = self.layout.unpack(body)
            if self.codec is not None:
                self.reference = {k: v.clone() for k, v in state.items()}
        self._settle(round, used == 1.0)
        return GlobalAdapter(round, state, final=kind in ("final", "final_c"))

    def recv_newest_global(self) -> GlobalAdapter:
        """The next global adapter, or the newest of those already waiting (a leader that fell
        behind skips the older ones; they are received, so the server's sends complete)."""
        message = self.recv_global()
        skipped = []
        while not message.final and self.comm.Iprobe(source=0, tag=TAG_TO_LEADER):
            skipped.append(message.round)
            message = self.recv_global()
        message.skipped = skipped
        return message

    def send_bye(self, client: int) -> None:
        request, _buf = self._send("bye", 0, TAG_TO_SERVER, client=client)
        wait_for(request.Test)

    # -- server side --

    def recv_layouts(self, clients: list[int]) -> Layout:
        """Every leader's layout; they must agree up to the LoRA rank (else no client's update could
        be averaged). Each client's messages are then sized by its own (`layout_of`)."""
        layouts = {}
        for c in clients:
            source = self.plan.federation_rank(c)
            # a leader sends its layout after the personal stage: wait without spinning
            wait_for(lambda: self.comm.Iprobe(source=source, tag=TAG_LAYOUT))
            layouts[c] = self.comm.recv(source=source, tag=TAG_LAYOUT)
            self._count(received=len(pickle.dumps(layouts[c])))
        first = layouts[clients[0]]
        for c, layout in layouts.items():
            diff = first.rank_difference(layout)
            if diff:
                raise TransportError(f"client {c}'s global adapter differs from client {clients[0]}'s ({diff}); "
                                     "every client must carry the same lora.global adapter on the same base "
                                     "(only its rank may differ: client_overrides.<i>.lora.global.r)")
        self.full_layouts = layouts
        self.layouts = {c: self._message_layout(layout) for c, layout in layouts.items()}
        self.layout = self.layouts[clients[0]]
        return first

    def recv_init(self, client: int) -> dict[str, torch.Tensor]:
        from mpi4py import MPI

        full = self.full_layouts.get(client, self.layout)
        buf = torch.empty(HEADER.size + max(full.nbytes, 4096), dtype=torch.uint8)
        status = MPI.Status()
        request = self.comm.Irecv([buf.numpy(), MPI.BYTE], source=self.plan.federation_rank(client), tag=TAG_TO_SERVER)
        wait_for(lambda: request.Test(status))
        kind, _, sender, _, _, body = self._decode(buf, status.Get_count(MPI.BYTE), f"client {client}", full)
        if kind != "init" or sender != client:
            raise TransportError(f"client {client}: expected its start-up adapter, got a {kind} message from client {sender}")
        return full.unpack(body)

    def post_receives(self, clients: list[int]) -> None:
        """Keep one receive posted for each leader from now on (until its bye)."""
        for c in clients:
            self._post(c)

    def _post(self, client: int) -> None:
        from mpi4py import MPI

        buf = torch.empty(HEADER.size + self.layout_of(client).nbytes, dtype=torch.uint8)
        request = self.comm.Irecv([buf.numpy(), MPI.BYTE], source=self.plan.federation_rank(client), tag=TAG_TO_SERVER)
        self.inbox[client] = (buf, request)

    def next_update(self, deadline: float | None) -> ClientUpdate | int | None:
        """The next message any leader sent, as it arrives: a ClientUpdate (as sent: the caller checks
        its round and values), or the client id of a leader's bye; None once `deadline`
        (time.monotonic()) passes. MPI has no wait with a timeout: the posted receives are tested
        with `wait_for`'s backoff."""
        from mpi4py import MPI

        if not self.inbox:
            raise TransportError("no leader is left to receive from")
        arrived = []

        def any_arrived() -> bool:
            for client, (buf, request) in self.inbox.items():
                status = MPI.Status()
                if request.Test(status):
                    arrived.append((client, buf, status.Get_count(MPI.BYTE)))
                    return True
            return False

        if not wait_for(any_arrived, deadline):
            return None
        client, buf, n = arrived[0]
        kind, round, sender, num_samples, loss, body = self._decode(buf, n, f"client {client}", self.layout_of(client))
        if sender != client or kind not in ("update", "update_c", "bye"):
            raise TransportError(f"client {client}: expected an update, got a {kind} message claiming client {sender}")
        if kind == "bye":
            del self.inbox[client]
            return client
        layout = self.layout_of(client)
        state = self._decode_change(body, self.reference_of(client), layout) if kind == "update_c" else layout.unpack(body)
        self._post(client)
        return ClientUpdate(round, client, num_samples, state, loss)

    def _encode_global(self, kind: str, state: dict, reference: dict | None, residual: dict | None,
                       layout: Layout | None) -> tuple:
        """(kind, what travels, its layout, the reference both ends then hold, the new residual) of
        one global adapter on one stream. Without compression the adapter itself. With it, a stream's
        first global adapter travels whole and becomes the reference; every later one travels as
        its change to the reference, encoded, with the stream's error feedback."""
        if self.codec is None:
            return kind, state, layout, None, None
        if reference is None:
            return kind, state, layout, {k: v.clone() for k, v in state.items()}, residual
        wire, decoded, residual = self._encode_change(sub(state, reference), residual)
        return kind + "_c", wire, self.wire_layout_of(layout or self.layout), add(reference, decoded), residual

    def send_global(self, message: GlobalAdapter, clients: list[int], states: dict | None = None):
        """Send the global adapter to every leader; returns what they will hold: `message.state`
        itself, or with compression the previous one plus the decoded change (the server keeps that,
        so that every rank holds the same global adapter bit for bit). `states`: client -> its own
        adapter instead (clients of different ranks); the return is then client -> what it holds,
        and with compression each client's stream keeps its own reference and residual."""
        kind = "final" if message.final else "global"
        if states is None:  # one adapter, one stream for all
            k, wire, layout, reference, residual = self._encode_global(kind, message.state, self.reference,
                                                                       self.residual, None)
            outgoing = {c: (k, wire, layout) for c in clients}
            if self.codec is None:
                held = message.state
            else:
                self.reference, self.residual = reference, residual
                held = {key: v.clone() for key, v in reference.items()}
        else:
            outgoing, held = {}, {}
            for c in clients:
                k, wire, layout, reference, residual = self._encode_global(
                    kind, states[c], self.references.get(c), self.residuals.get(c), self.layout_of(c))
                outgoing[c] = (k, wire, layout)
                if self.codec is None:
                    held[c] = states[c]
                else:
                    self.references[c], self.residuals[c] = reference, residual
                    held[c] = {key: v.clone() for key, v in reference.items()}
        # started, not waited for: the round's deadline runs while a leader still in an earlier
        # round has not taken its copy (it takes the newest waiting when it gets there)
        self.outbox = [(r, b) for r, b in self.outbox if not r.Test()]
        for c in clients:
            k, wire, layout = outgoing[c]
            self.outbox.append(self._send(k, self.plan.federation_rank(c), TAG_TO_LEADER, state=wire, round=message.round,
                                          layout=layout, num_samples=1.0 if c in message.used else 0.0))
        return held

    def flush(self) -> None:
        """Wait (yielding) until every global adapter sent has been taken (the job's end)."""
        from mpi4py import MPI

        requests = [r for r, _ in self.outbox]
        wait_for(lambda: MPI.Request.Testall(requests))
        self.outbox = []

    def abort(self, reason: str, clients: list[int]) -> None:
        """Tell every leader to stop, with the reason (in place of the global adapter it waits for)."""
        self._send_all([("abort", self.plan.federation_rank(c), TAG_TO_LEADER, {"text": reason[:4000]}) for c in clients])
