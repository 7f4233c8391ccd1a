"""Evaluation by greedy generation (eval.generate): the string metrics against hand-computed values,
the batched, cached decoder against a plain one-row argmax loop, the engine's and FedDPA's paths,
config errors, and real jobs on ZeRO-2 and ZeRO-3 checked against a single-process recomputation."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import torch

from fdlora_cluster.config import ConfigError, config_from_dict, load_config
from fdlora_cluster.generation import (cached_forward, exact_match, greedy_decode, lcs_length, normalize, prompt_ids,
                                       rouge_l)
from fdlora_cluster.state import GLOBAL, PERSONAL

from one_rank import OneRank
from conftest import (CONFIGS, JOB_TIMEOUT, ROOT, TINY, assert_ok, job_env, mpiexec, read_summary, run_job,
                      write_config)

# --------------------------------------------------------------------------- metrics


@pytest.mark.unit
def test_exact_match_normalises_whitespace_only():
    assert normalize("  the  cat\n sat\t") == "the cat sat"
    assert exact_match(" abnormal\n", "abnormal") == 1.0
    assert exact_match("a  b", "a b") == 1.0
    assert exact_match("Abnormal", "abnormal") == 0.0  # case is kept
    assert exact_match("abnormal.", "abnormal") == 0.0  # so is punctuation
    assert exact_match("", "   ") == 1.0


@pytest.mark.unit
def test_lcs_by_hand():
    assert lcs_length("a b a b".split(), "b a b a".split()) == 3
    assert lcs_length("a b c".split(), "x y".split()) == 0
    assert lcs_length([], "a".split()) == 0
    assert lcs_length("a b c d e".split(), "a c e".split()) == 3


@pytest.mark.unit
def test_rouge_l_by_hand():
    # LCS "the cat on the mat" = 5 of 6 tokens each way: P = R = F = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS "b d" = 2: P = 2/4, R = 2/3, F = 2PR/(P+R) = (2/3) / (7/6) = 4/7
    assert rouge_l("a b c d", "b d e") == pytest.approx(4 / 7)
    assert rouge_l("b d e", "a b c d") == pytest.approx(4 / 7)  # F1 is symmetric
    # "b a b" is itself a subsequence of "a b a b": LCS 3, P = 3/4, R = 3/3, F = 1.5 / 1.75 = 6/7
    assert rouge_l("a b a b", "b a b") == pytest.approx(6 / 7)
    assert rouge_l("x y", "a b") == 0.0
    assert rouge_l(" abnormal ", "abnormal") == 1.0
    assert rouge_l("", "") == 1.0
    assert rouge_l("", "a") == 0.0 and rouge_l("a", "") == 0.0


# --------------------------------------------------------------------------- decoding on one process


@pytest.fixture(scope="module")
def one_rank():
    return OneRank(seed=3, scale=0.05, overrides=["eval.generate=true", "eval.max_new_tokens=12"])


@pytest.mark.unit
def test_prompt_is_what_training_puts_before_the_response():
    """A prompt/response row: its prompt; a chat row: every turn before the last assistant turn's
    content (earlier answers with their eos, the last header included); cut from the left."""
    from fdlora_cluster.data import Example, get_tokenizer
    from fdlora_cluster.data.chat import plain_prompt

    tok = get_tokenizer(None)
    assert prompt_ids(tok, Example("Is 'disk panic' abnormal?", " yes"), 48) == tok.encode("Is 'disk panic' abnormal?")
    assert prompt_ids(tok, Example("abcdef", " yes"), 4) == tok.encode("cdef")
    assert prompt_ids(tok, Example("", " yes"), 48) == [tok.eos_id]
    msgs = (("user", "a?"), ("assistant", "b"), ("user", "c?"), ("assistant", "d"))
    chat = Example(plain_prompt(msgs), "d", messages=msgs)
    assert prompt_ids(tok, chat, 99) == tok.encode("user: a?\nassistant: b") + [tok.eos_id] + tok.encode("user: c?\nassistant: ")


@torch.no_grad()
def argmax_loop(model, prompt: list[int], max_new: int, eos: int) -> list[int]:
    """The plainest greedy decoder: one row, no padding, no cache, the whole sequence every step."""
    ids, out = list(prompt), []
    for _ in range(max_new):
        t = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if t == eos:
            break
        out.append(t)
        ids.append(t)
    return out


@pytest.mark.unit
def test_batched_cached_decoding_equals_a_plain_argmax_loop(one_rank):
    from fdlora_cluster.model import set_active

    e = one_rank
    e.model.eval()
    set_active(e.model, [PERSONAL, GLOBAL])
    rows = e.data.test[:6]
    prompts = [prompt_ids(e.tok, r, e.cfg.train.max_seq_len) for r in rows]
    prompts[1] = prompts[1][-5:]  # rows of very different lengths, so left padding matters
    assert len({len(p) for p in prompts}) > 2
    got = greedy_decode(cached_forward(e.model, e.model), prompts, 12, e.tok.eos_id, e.tok.pad_id)
    want = [argmax_loop(e.model, p, 12, e.tok.eos_id) for p in prompts]
    assert got == want
    # the adapters are in the loop: with the personal adapter alone the answers differ
    set_active(e.model, PERSONAL)
    assert greedy_decode(cached_forward(e.model, e.model), prompts, 12, e.tok.eos_id, e.tok.pad_id) != got


@pytest.mark.unit
def test_padding_and_positions_matter_on_absolute_positions():
    """On Llama (RoPE) a shift of every position changes nothing, so the test above cannot see the
    position ids; GPT-2's learned absolute positions can. A random tiny GPT-2 (init wide enough that
    its argmax moves) decodes rows of lengths 3, 9, 1, 6 as one row at a time would; leaving out the
    position ids or the padding mask breaks that (checked when this test was written)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
            "gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=258, initializer_range=0.3,
            bos_token_id=257, eos_token_id=257)).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 9, 1, 6)]
    forward = cached_forward(model, model)
    want = [argmax_loop(model, p, 10, 257) for p in prompts]
    assert greedy_decode(forward, prompts, 10, 257, 256) == want
    assert greedy_decode(lambda i, m, p, c: forward(i, m, None, c), prompts, 10, 257, 256) != want
    assert greedy_decode(lambda i, m, p, c: forward(i, torch.ones_like(m), p, c), prompts, 10, 257, 256) != want


@pytest.mark.unit
def test_decoding_stops_at_eos_and_every_rank_steps_while_any_has_work():
    """A fake model that says eos after k tokens: rows stop there; `keep_going` sees every step."""
    eos = 9

    def forward(ids, mask, pos, past):
        n = ids.shape[0]
        step = 0 if past is None else past + 1
        logits = torch.zeros(n, 1, 10)
        for i in range(n):  # row i says token 1 until its step i, then eos
            logits[i, 0, eos if step >= i else 1] = 1.0
        return logits, step

    seen = []
    out = greedy_decode(forward, [[1], [1, 2], [3]], 5, eos, 0, keep_going=lambda u: seen.append(u) or True)
    assert out == [[], [1], [1, 1]]
    assert seen == [True, True, True, False, False]  # told it was done, it still stepped: another rank had rows
    out = greedy_decode(forward, [[1], [1, 2], [3]], 5, eos, 0)
    assert out == [[], [1], [1, 1]]


@pytest.mark.unit
def test_engine_evaluate_reports_generation_as_a_hand_loop_scores_it(one_rank):
    from fdlora_cluster.model import set_active

    e = one_rank
    rows = e.data.test[:5]
    out = e.evaluate(rows, GLOBAL)
    set_active(e.model, GLOBAL)
    texts = [e.tok.decode(argmax_loop(e.model, prompt_ids(e.tok, r, e.cfg.train.max_seq_len), 12, e.tok.eos_id))
             for r in rows]
    assert out["exact_match"] == pytest.approx(sum(exact_match(t, r.response) for t, r in zip(texts, rows)) / 5)
    assert out["rouge_l"] == pytest.approx(sum(rouge_l(t, r.response) for t, r in zip(texts, rows)) / 5)
    assert out["generated_rows"] == 5 and "loss" in out and "perplexity" in out


@pytest.mark.unit
def test_generate_rows_and_metrics_limit_what_is_decoded_and_reported():
    e = OneRank(seed=3, scale=0.05, overrides=["eval.generate=true", "eval.max_new_tokens=4", "eval.generate_rows=3", 'eval.metrics=["rouge_l"]'])
    out = e.evaluate(e.data.test[:5], PERSONAL)
    assert out["generated_rows"] == 3 and out["rows"] == 5
    assert "rouge_l" in out and "exact_match" not in out


@pytest.mark.unit
def test_generation_off_by_default(one_rank):
    e = OneRank(seed=3, scale=0.05)
    assert e.cfg.eval.generate is False
    out = e.evaluate(e.data.test[:2], PERSONAL)
    assert "exact_match" not in out and "rouge_l" not in out


@pytest.mark.unit
def test_feddpa_row_weights_hold_through_every_decoding_step(one_rank):
    """Instance-weighted generation of a batch equals each row decoded alone with its weights as
    per-call scales (which ClientEngine.evaluate applies the same way for every row)."""
    from fdlora_cluster.evaluation import evaluate_instance_weighted

    e = one_rank
    rows = e.data.test[:4]
    w = torch.tensor([0.0, 1.0, 0.4, -0.5], dtype=torch.float64)
    batched = evaluate_instance_weighted(e, rows, w)
    singles = [e.evaluate([r], [PERSONAL, GLOBAL], {PERSONAL: 1 - float(wi), GLOBAL: float(wi)}) for r, wi in zip(rows, w)]
    assert batched["generated_rows"] == 4
    for k in ("exact_match", "rouge_l"):
        assert batched[k] == pytest.approx(sum(s[k] for s in singles) / 4)
    assert "exact_match" not in evaluate_instance_weighted(e, rows, w, generate=False)


# --------------------------------------------------------------------------- config


def demo_raw(**eval_keys):
    from fdlora_cluster.config import read_yaml

    raw = read_yaml(str(CONFIGS / "demo.yaml"))
    raw["eval"] = {"generate": True, **eval_keys}
    return raw


@pytest.mark.unit
@pytest.mark.parametrize("keys, message", [
    ({"max_new_tokens": -1}, r"eval\.max_new_tokens = -1 must be >= 1"),
    ({"max_new_tokens": 0}, r"eval\.max_new_tokens = 0 must be >= 1"),
    ({"generate_rows": 0}, r"eval\.generate_rows = 0 must be >= 1 \(or null"),
    ({"metrics": ["bleu"]}, r"eval\.metrics\[0\] = 'bleu' is not valid; expected one of 'exact_match', 'rouge_l'"),
    ({"metrics": "rouge_l"}, r"eval\.metrics = 'rouge_l' is not valid; expected a list of one of 'exact_match', 'rouge_l'"),
    ({"metrics": []}, r"eval\.metrics = \[\]: list each of exact_match, rouge_l at most once, and at least one"),
    ({"metrics": ["rouge_l", "rouge_l"]}, r"eval\.metrics = .*at most once"),
    ({"generate": "yes"}, r"eval\.generate = 'yes' is not valid; expected bool"),
])
def test_bad_generation_config_names_the_key_and_the_allowed_values(keys, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(demo_raw(**keys))


# --------------------------------------------------------------------------- real jobs


def single_process_scores(cfg, run_dir, client: int, adapter: str) -> dict:
    """The job's generation metrics recomputed on this process from the saved adapter (fused and
    personal from the client's directory, global from the server's)."""
    from peft import PeftModel

    from fdlora_cluster.data import get_tokenizer, load_clients
    from fdlora_cluster.evaluation import generation_metrics
    from fdlora_cluster.model import build_base

    tok = get_tokenizer(None)
    path = run_dir / "adapters" / ("global" if adapter == GLOBAL else f"client-{client}/{adapter}")
    model = PeftModel.from_pretrained(build_base(cfg.model, cfg.seed, vocab_size=tok.vocab_size), str(path)).eval()
    one = types.SimpleNamespace(cfg=cfg, tok=tok, engine=model, model=model, device=torch.device("cpu"), size=1, local_rank=0,
                                comm=types.SimpleNamespace(allreduce=lambda x: x))
    data = load_clients(cfg.data, len(cfg.client_sizes()), cfg.seed)[client]
    return generation_metrics(one, data.test)


def mpi_script(n: int, script: str, *args) -> subprocess.CompletedProcess:
    """`mpiexec -n n python tests/mpi_scripts/<script> <args>` under the jobs' timeout."""
    cmd = [mpiexec(), "-n", str(n), sys.executable, str(ROOT / "tests" / "mpi_scripts" / script), *map(str, args)]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT, env=job_env(), cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"job timed out after {JOB_TIMEOUT}s: {' '.join(cmd)}\n{(e.stdout or b'')[-3000:]!r}")


@pytest.mark.job
@pytest.mark.parametrize("stage", [2, 3])
def test_generation_eval_in_a_job_matches_a_single_process(tmp_path, stage):
    """fdlora, one client of 2 ranks plus one of 1: every evaluated adapter (personal, global, fused)
    carries exact_match and rouge_l in [0, 1], both ranks of the 2-rank client got the same numbers,
    and they are what one process computes from the saved adapters. 7 rows over 2 ranks in batches
    of 2: the ranks have uneven rows and batches, so the padding and the lockstep of ZeRO-3's
    collective forwards are exercised."""
    cfg_path = write_config(tmp_path, "demo.yaml", **{
        **TINY, "topology.clients": [2, 1], "deepspeed": {"zero_optimization": {"stage": stage}},
        "fusion.budget": 4, "fusion.folds": 1, "train.eval_batch_size": 2,
        "eval.generate": True, "eval.max_new_tokens": 12, "eval.generate_rows": 7})
    cfg = load_config(cfg_path)
    run_dir = tmp_path / "run"
    proc = mpi_script(cfg.world_size(), "eval_every_rank.py", cfg_path, tmp_path / "ranks")
    assert_ok(proc)
    assert "exact_match" in proc.stdout + proc.stderr  # the printed per-client table has the columns
    per_rank = [json.loads((tmp_path / "ranks" / f"eval-rank-{r}.json").read_text()) for r in (1, 2)]
    assert per_rank[0] == per_rank[1] and len(per_rank[0]) == 3  # ranks 1, 2: client 0
    summary = read_summary(run_dir)
    assert [c["zero_stage"] for c in summary["clients"]] == [stage, stage]
    for c in summary["clients"]:
        assert set(c["metrics"]) == {PERSONAL, GLOBAL, "fused"}
        for adapter, m in c["metrics"].items():
            assert 0.0 <= m["exact_match"] <= 1.0 and 0.0 <= m["rouge_l"] <= 1.0, m
            assert m["generated_rows"] == 7 and m["rows"] > 7
            if c["client"] == 0:  # the 2-rank client, against one process
                alone = single_process_scores(cfg, run_dir, 0, adapter)
                assert alone["exact_match"] == pytest.approx(m["exact_match"]), adapter
                assert alone["rouge_l"] == pytest.approx(m["rouge_l"]), adapter


# --------------------------------------------------------------------------- the tables


@pytest.mark.unit
def test_tables_show_generation_columns_only_when_a_run_has_them(tmp_path):
    from fdlora_cluster.report import write_report
    from fdlora_cluster.train import results_table

    from test_report import fake_run

    gen = fake_run(tmp_path / "gen", "fedavg", [0.5, 0.7])
    summary = json.loads(open(f"{gen}/summary.json").read())
    for c, (em, rl) in zip(summary["clients"], [(0.25, 0.5), (0.75, 1.0)]):
        c["metrics"]["global"].update(exact_match=em, rouge_l=rl, generated_rows=10)
    open(f"{gen}/summary.json", "w").write(json.dumps(summary))
    plain = fake_run(tmp_path / "plain", "local", [0.6, 0.8])

    text = open(write_report([gen, plain], out_dir=str(tmp_path / "rep"))).read()
    assert "| method | client | adapter | accuracy | exact_match | rouge_l | loss | perplexity | test rows |" in text
    assert "| fedavg | 0 | global | 0.500 | 0.250 | 0.500 | 0.1000 |" in text
    assert "| fedavg | mean | global | 0.600 | 0.500 | 0.750 |" in text
    assert "| local | 0 | personal | 0.600 | - | - |" in text  # a run without them shows a dash
    assert "### rouge_l of each method's headline adapter" in text and "| mean | 0.750 | - |" in text
    alone = open(write_report([plain], out_dir=str(tmp_path / "rep2"))).read()
    assert "exact_match" not in alone and "rouge_l" not in alone

    table = results_table(summary).splitlines()
    assert table[0].split() == ["client", "ranks", "method", "adapter", "accuracy", "exact_match", "rouge_l", "loss", "rows"]
    assert table[2].split()[4:7] == ["0.500", "0.250", "0.500"]
    assert "exact_match" not in results_table(json.loads(open(f"{plain}/summary.json").read()))


@pytest.mark.job
def test_generation_eval_in_a_feddpa_job_with_instance_weights(tmp_path):
    """FedDPA's instance-weighted pair (reported as `fused`) goes through the same generation code:
    a real job on ZeRO-2 (FedDPA's tested stage), a 2-rank client, every evaluated adapter scored."""
    cfg_path = write_config(tmp_path, "feddpa.yaml", **TINY, **{
        "topology.clients": [2, 1], "train.eval_batch_size": 2,
        "eval.generate": True, "eval.max_new_tokens": 12, "eval.generate_rows": 5})
    proc, run_dir = run_job(cfg_path)
    assert_ok(proc)
    for c in read_summary(run_dir)["clients"]:
        assert set(c["metrics"]) == {PERSONAL, GLOBAL, "fused"} and "instance_global_weight" in c
        for m in c["metrics"].values():
            assert 0.0 <= m["exact_match"] <= 1.0 and 0.0 <= m["rouge_l"] <= 1.0 and m["generated_rows"] == 5, m
