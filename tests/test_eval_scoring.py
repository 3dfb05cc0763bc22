"""Scoring, rolling windows, bits-per-byte and the lm-eval adapter on a tiny random HF Llama.

The tiny model (saved to a tmp dir with a BPE tokenizer trained here) keeps these checks fast
and independent of ../shared; every expected value comes from an independent computation
(HF's own loss, per-token forwards, lm-eval's HFLM), never from a constant.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from megatron_cpt.errors import UserError
from megatron_cpt.evaluation.backend import BackendSpec, load_backend
from megatron_cpt.evaluation.lm_eval_adapter import MegatronCPTLM
from megatron_cpt.evaluation.perplexity import (
    PerplexityConfig,
    evaluate_set,
    rolling_requests,
)

CORPUS = [
    "Revenue increased 12% year over year, driven by higher subscription sales in Europe.",
    "The Company's operating margin declined to 8.4% from 9.1% due to restructuring charges.",
    "Net cash provided by operating activities was $1.2 billion for the fiscal year.",
    "The Borrower shall repay the Loans in full on the Maturity Date.",
    "Gold prices rose on Tuesday as the dollar weakened against major currencies.",
    "Wikipedia is a free online encyclopedia written collaboratively by volunteers.",
    "Café prices in Zürich — naïve résumé: ünïcödé bytes count more than characters.",
]


def load_tool(name: str):
    """``tools/NAME.py`` as a module (tools/ is scripts, not a package on sys.path)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tiny_llama(path):
    """A 2-layer random Llama + a BPE tokenizer trained on CORPUS, saved as an HF directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    # random init gives near-uniform logits; sharpen them so greedy/argmax checks mean something
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_backend(BackendSpec(hf=str(tiny_dir)))


@pytest.fixture
def jsonl(tmp_path):
    def write(records, name="set.jsonl"):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        return path

    return write


def direct_nll(model, prefix: int, tokens: list[int]) -> float:
    """Summed NLL of ``tokens`` after ``prefix`` with full context, via HF's own loss."""
    ids = torch.tensor([[prefix] + tokens])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss  # mean over the len(tokens) shifted targets
    return float(loss) * len(tokens)


def test_bits_per_byte_matches_direct_computation(tiny, jsonl):
    docs = CORPUS[:3] + [CORPUS[-1]]
    path = jsonl([{"id": i, "text": t} for i, t in enumerate(docs)])
    result = evaluate_set(tiny, "d", [str(path)], PerplexityConfig(seq_length=128, batch_size=3))

    prefix = tiny.tokenizer.bos_id
    token_lists = [tiny.tokenizer.encode(t) for t in docs]
    nll = sum(direct_nll(tiny.model, prefix, toks) for toks in token_lists)
    nbytes = sum(len(t.encode("utf-8")) for t in docs)
    ntokens = sum(len(t) for t in token_lists)
    assert nbytes > sum(len(t) for t in docs)  # the non-ASCII doc really counts bytes
    assert result.docs == len(docs)
    assert result.tokens == ntokens
    assert result.bytes == nbytes
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.bpb == pytest.approx(nll / math.log(2) / nbytes, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll / ntokens), rel=1e-5)


@pytest.mark.parametrize("seq_length,stride", [(8, 8), (8, 3), (8, 1), (16, 5), (200, 200)])
def test_rolling_windows_score_every_token_once(seq_length, stride):
    tokens = list(range(100, 157))
    windows = rolling_requests(tokens, prefix=1, seq_length=seq_length, stride=stride)
    scored = [t for w in windows for t in w.target]
    assert scored == tokens
    for w in windows:
        assert len(w.context) + len(w.target) - 1 <= seq_length  # model input length
        assert len(w.context) >= 1


def test_sliding_windows_equal_per_token_context(tiny):
    """stride=1: every token is predicted from exactly min(i+1, L) preceding tokens."""
    text = " ".join(CORPUS[:2])
    tokens = tiny.tokenizer.encode(text)
    seq_length = 8
    assert len(tokens) > 3 * seq_length
    cfg = PerplexityConfig(seq_length=seq_length, stride=1, batch_size=16)
    from megatron_cpt.evaluation.perplexity import score_texts

    _, ntok, _, nll = score_texts(tiny, [text], cfg, desc=None)

    full = [tiny.tokenizer.bos_id] + tokens
    expected = 0.0
    with torch.no_grad():
        for i, tok in enumerate(tokens):
            ctx = full[max(0, i + 1 - seq_length) : i + 1]
            logits = tiny.model(input_ids=torch.tensor([ctx])).logits[0, -1]
            expected -= float(torch.log_softmax(logits.float(), -1)[tok])
    assert ntok == len(tokens)
    assert nll == pytest.approx(expected, rel=1e-5)


def test_long_context_equals_full_context_and_short_windows_differ(tiny):
    text = " ".join(CORPUS)
    tokens = tiny.tokenizer.encode(text)
    from megatron_cpt.evaluation.perplexity import score_texts

    full = direct_nll(tiny.model, tiny.tokenizer.bos_id, tokens)
    _, _, _, nll_long = score_texts(tiny, [text], PerplexityConfig(seq_length=256), desc=None)
    _, n_short, _, nll_short = score_texts(tiny, [text], PerplexityConfig(seq_length=16), desc=None)
    assert nll_long == pytest.approx(full, rel=1e-5)
    assert n_short == len(tokens)
    assert nll_short != pytest.approx(full, rel=1e-4)  # windows really cut the context


def test_bad_inputs_are_one_line_user_errors(tiny, jsonl, tmp_path):
    bad = jsonl([{"text": "fine"}, {"body": "no text key"}], name="bad.jsonl")
    with pytest.raises(UserError, match=r"bad\.jsonl:2: missing key 'text'"):
        evaluate_set(tiny, "b", [str(bad)], PerplexityConfig(seq_length=16))
    empty = jsonl([{"text": "  "}], name="empty.jsonl")
    with pytest.raises(UserError, match="no documents"):
        evaluate_set(tiny, "e", [str(empty)], PerplexityConfig(seq_length=16))
    with pytest.raises(UserError, match="--stride"):
        evaluate_set(tiny, "b", [str(bad)], PerplexityConfig(seq_length=16, stride=17))
    with pytest.raises(UserError, match="no such model"):
        load_backend(BackendSpec(hf=str(tmp_path / "nope")))
    with pytest.raises(UserError, match="exactly one"):
        load_backend(BackendSpec())
    good = jsonl([{"text": CORPUS[0]}], name="good.jsonl")
    with pytest.raises(UserError, match="exceeds the model's maximum of 256"):
        evaluate_set(tiny, "g", [str(good)], PerplexityConfig(seq_length=512))


# -- lm-eval adapter vs lm-eval's own HF model ----------------------------------------------


def _requests(kind, args_list):
    return [Instance(kind, {}, args, idx=i) for i, args in enumerate(args_list)]


@pytest.fixture(scope="module")
def both_lms(tiny):
    ours = MegatronCPTLM(backend=tiny, batch_size=3, max_length=24, max_gen_toks=6)
    ref = HFLM(
        pretrained=tiny.model,
        tokenizer=tiny.tokenizer.hf,
        batch_size=3,
        max_length=24,
        device="cpu",
    )
    return ours, ref


def test_adapter_loglikelihood_matches_hflm(both_lms):
    ours, ref = both_lms
    pairs = [
        ("Revenue increased", " 12% year over year"),
        ("The Borrower shall repay the Loans", " in full"),
        ("", "Gold prices rose on Tuesday"),
        ("Question: is gold up?\nAnswer:", " Yes"),
        ("Question: is gold up?\nAnswer:", " No"),
        # longer than max_length: both must left-truncate the same way
        (" ".join(CORPUS[:2]), " Net cash"),
    ]
    got = ours.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    want = ref.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    assert len(got) == len(pairs)
    for (lp, greedy), (ref_lp, ref_greedy) in zip(got, want):
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert greedy == ref_greedy
    assert len({round(lp, 3) for lp, _ in got}) == len(pairs)  # not a degenerate constant


def test_adapter_rolling_matches_hflm(both_lms):
    ours, ref = both_lms
    docs = [(CORPUS[0],), (" ".join(CORPUS),)]  # the second spans several 24-token windows
    got = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", docs), disable_tqdm=True)
    want = ref.loglikelihood_rolling(_requests("loglikelihood_rolling", docs), disable_tqdm=True)
    assert got == pytest.approx(want, abs=1e-3)


def test_adapter_generate_until_matches_hflm(both_lms):
    ours, ref = both_lms
    reqs = [
        ("Revenue increased", {"until": ["\n"], "do_sample": False, "max_gen_toks": 6}),
        ("The Borrower", {"until": ["."], "do_sample": False, "max_gen_toks": 6}),
    ]
    got = ours.generate_until(_requests("generate_until", reqs), disable_tqdm=True)
    want = ref.generate_until(_requests("generate_until", reqs), disable_tqdm=True)
    assert got == want
    assert any(got)


def test_adapter_registered_for_lm_eval_cli(tiny_dir):
    from lm_eval.api.registry import get_model

    cls = get_model("megatron-cpt")
    lm = cls.create_from_arg_string(f"hf={tiny_dir},max_length=32", {"batch_size": "2"})
    assert lm.max_length == 32 and lm.batch_size == 2
    ((lp, _),) = lm.loglikelihood(_requests("loglikelihood", [("Gold", " prices")]), True)
    assert lp < 0


# -- Megatron backend: a converted pair must score like its HF source -----------------------


@pytest.fixture(scope="module")
def converted(tiny_dir, tmp_path_factory):
    from megatron_cpt.convert.importer import ImportConfig, import_hf

    out = tmp_path_factory.mktemp("tiny_mcore") / "ckpt"
    import_hf(ImportConfig(str(tiny_dir), str(out)))
    return out


def test_megatron_perplexity_matches_hf(tiny, converted, jsonl):
    megatron = load_backend(BackendSpec(megatron=str(converted)))
    assert megatron.tokenizer.encode(CORPUS[-1]) == tiny.tokenizer.encode(CORPUS[-1])
    path = jsonl([{"text": t} for t in CORPUS])
    cfg = PerplexityConfig(seq_length=32, batch_size=4)  # several windows per document
    ours = evaluate_set(megatron, "d", [str(path)], cfg)
    ref = evaluate_set(tiny, "d", [str(path)], cfg)
    assert (ours.tokens, ours.bytes) == (ref.tokens, ref.bytes)
    assert abs(ours.ppl / ref.ppl - 1) < 1e-3  # the acceptance bar: 0.1%
    assert ours.bpb == pytest.approx(ref.bpb, rel=1e-5)  # what we actually get on CPU fp32


def test_megatron_adapter_matches_hf_adapter(tiny, converted):
    megatron = load_backend(BackendSpec(megatron=str(converted)))
    pairs = [("Gold prices", " rose on Tuesday"), ("", "The Borrower shall repay")]
    got = MegatronCPTLM(backend=megatron).loglikelihood(_requests("loglikelihood", pairs), True)
    want = MegatronCPTLM(backend=tiny).loglikelihood(_requests("loglikelihood", pairs), True)
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=1e-4)


def test_megatron_tokenizer_errors(tmp_path, converted):
    with pytest.raises(UserError, match="no such checkpoint"):
        load_backend(BackendSpec(megatron=str(tmp_path / "missing")))
    with pytest.raises(UserError, match="--tokenizer .*no such file"):
        load_backend(BackendSpec(megatron=str(converted), tokenizer=str(tmp_path / "nope")))


# -- the CLI ----------------------------------------------------------------------------------


@pytest.fixture
def finance_dir(tmp_path):
    """A miniature of ../shared/data/tasks in the same formats (README there)."""
    root = tmp_path / "tasks"
    root.mkdir()

    def write(name, rows):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    sentiment = [
        {"text": "Profit rose sharply.", "label": "positive"},
        {"text": "The company reported a loss.", "label": "negative"},
        {"text": "The meeting is on Monday.", "label": "neutral"},
        {"text": "Sales fell 5%.", "label": "negative"},
    ]
    write("fpb.jsonl", sentiment)
    for split in ("train", "valid", "test"):
        write(f"fiqasa_{split}.jsonl", sentiment)
    q = "Does the news headline talk about price going up? Answer Yes or No."
    write(
        "headlines.jsonl",
        [
            {"text": f"gold {verb} {when}", "question": q, "label": label}
            for verb, label in (("climbs", "yes"), ("slips", "no"), ("steadies", "no"))
            for when in ("today", "on dollar", "to record")
        ],  # 9 rows: enough for 5 shots plus the evaluated one
    )
    return root


def test_cli_writes_results_json(tiny_dir, jsonl, finance_dir, tmp_path, capsys):
    main = load_tool("evaluate").main

    dom = jsonl([{"text": t} for t in CORPUS[:4]], name="dom.jsonl")
    gen = jsonl([{"text": t} for t in CORPUS[4:]], name="gen.jsonl")
    out = tmp_path / "res" / "base.json"
    code = main(
        [
            "--hf", str(tiny_dir), "--data", f"domain={dom}", "--data", f"general={gen}",
            "--seq-length", "32", "--tasks", "fpb,headlines_5shot", "--limit", "2",
            "--task-data-dir", str(finance_dir), "--output", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    from megatron_cpt.evaluation.results import load_results

    res = load_results(out)
    assert set(res["perplexity"]) == {"domain", "general"}
    assert res["perplexity"]["domain"]["docs"] == 4
    assert res["perplexity"]["general"]["bytes"] == sum(len(t.encode()) for t in CORPUS[4:])
    assert set(res["tasks"]) == {"fpb", "headlines_5shot"}
    assert res["tasks"]["fpb"]["samples"] == 2 and res["tasks"]["fpb"]["num_fewshot"] == 0
    assert res["tasks"]["headlines_5shot"]["num_fewshot"] == 5
    assert 0.0 <= res["tasks"]["fpb"]["f1"] <= 1.0
    assert "domain" in capsys.readouterr().out
    assert not list(out.parent.glob(".*.tmp"))  # no temp file left behind


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data", "x=/nonexistent.jsonl"], "no such file"),
        (["--data", "=a.jsonl"], "expected NAME=PATH"),
        ([], "nothing to evaluate"),
        # slow: an unknown name may be one of lm-eval's ~10k task YAMLs, which it indexes first
        pytest.param(["--tasks", "no_such_task"], "unknown task", marks=pytest.mark.slow),
    ],
)
def test_cli_errors_are_one_line(tiny_dir, finance_dir, args, message, capsys):
    from megatron_cpt.cli import run

    main = load_tool("evaluate").main

    argv = ["--hf", str(tiny_dir), "--task-data-dir", str(finance_dir), *args]
    with pytest.raises(SystemExit) as exc:
        run(main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_finance_bad_label_names_file_and_line(tiny, finance_dir):
    from megatron_cpt.evaluation.tasks_runner import TasksConfig, run_tasks

    (finance_dir / "fpb.jsonl").write_text(
        '{"text": "x", "label": "positive"}\n{"text": "y", "label": "bullish"}\n'
    )
    lm = MegatronCPTLM(backend=tiny)
    with pytest.raises(UserError, match=r"fpb\.jsonl:2: field 'label' is 'bullish'"):
        run_tasks(lm, TasksConfig(tasks=["fpb"], limit=1, data_dir=str(finance_dir)))
