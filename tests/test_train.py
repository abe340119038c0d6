"""Training: a learnable task, exact resume, completion-only masking, PEFT round trip, bad data."""
import json
import random
import shutil

import pytest
import torch

from loratools.errors import InputError, OutputError
from loratools.formats.peft import read_peft
from loratools.models import load_model
from loratools.train import data
from loratools.train.loop import TrainConfig, default_lr, train

WORDS = ["apple", "river", "stone", "cloud", "green", "tiger", "music", "paper"]


def mapping_data(tmp_path, kind="pc", repeat=8):
    """A fixed word → 3-digit code mapping: nothing the base model can know."""
    rnd = random.Random(0)
    codes = {w: str(rnd.randint(100, 999)) for w in WORDS}

    def rec(w):
        if kind == "pc":
            return {"prompt": f"Code for {w}:", "completion": f" {codes[w]}"}
        return {"messages": [{"role": "user", "content": f"Code for {w}?"}, {"role": "assistant", "content": codes[w]}]}

    tr, ev = tmp_path / f"train-{kind}.jsonl", tmp_path / f"eval-{kind}.jsonl"
    tr.write_text("".join(json.dumps(rec(w)) + "\n" for _ in range(repeat) for w in WORDS))
    ev.write_text("".join(json.dumps(rec(w)) + "\n" for w in WORDS))
    return tr, ev


def cfg(**kw):
    base = dict(rank=8, alpha=16, seq_len=48, batch_size=4, epochs=12, lr=3e-3, warmup=4, eval_every=1000,
                checkpoint_every=1000, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("kind", ["pc", "chat"])
def test_learns_a_mapping_the_base_cannot_know(fx, tmp_path, kind):
    tr, ev = mapping_data(tmp_path, kind)
    rep = train(fx / "models" / "llama", tr, tmp_path / "out", cfg(lr=1e-2, epochs=20, rank=16, alpha=32),
                eval_path=ev, log=lambda m: None)
    first, last = rep["eval_loss_initial"], rep["eval_losses"][-1][1]
    assert last < 0.25 * first, (first, last)  # measured: 6.4 → 0.4 (prompt/completion)
    assert (tmp_path / "out" / "metrics.jsonl").read_text().count("\n") == rep["steps"]


def test_trained_adapter_loads_in_peft_with_the_same_logits(fx, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    tr, _ = mapping_data(tmp_path)
    train(fx / "models" / "qwen3", tr, tmp_path / "out", cfg(epochs=2, rslora=True), log=lambda m: None)
    ids = torch.randint(0, 380, (1, 12), generator=torch.Generator().manual_seed(0))
    a = read_peft(tmp_path / "out")
    ours = load_model(fx / "models" / "qwen3", adapters=[a])(ids)[0]
    base = load_model(fx / "models" / "qwen3")(ids)[0]
    m = transformers.AutoModelForCausalLM.from_pretrained(str(fx / "models" / "qwen3"), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        ref = peft.PeftModel.from_pretrained(m.eval(), str(tmp_path / "out"))(ids).logits
    assert (ours - base).abs().max() > 1e-3 and (ours - ref).abs().max() <= 1e-5
    assert a.use_rslora and set(a.ranks.values()) == {8} and len(a.modules) == 14


def test_resume_gives_the_same_loss_curve(fx, tmp_path):
    tr, ev = mapping_data(tmp_path)
    c = dict(epochs=3, checkpoint_every=4, eval_every=5)
    full = train(fx / "models" / "llama", tr, tmp_path / "a", cfg(**c), eval_path=ev, log=lambda m: None)
    part = train(fx / "models" / "llama", tr, tmp_path / "b", cfg(**c, stop_after=7), eval_path=ev, log=lambda m: None)
    assert part["stopped_at"] == 7 and not (tmp_path / "b").exists()
    with pytest.raises(OutputError, match="--resume"):
        train(fx / "models" / "llama", tr, tmp_path / "b", cfg(**c), eval_path=ev, log=lambda m: None)
    rest = train(fx / "models" / "llama", tr, tmp_path / "b", cfg(**c), eval_path=ev, resume=True, log=lambda m: None)
    assert rest["losses"] == full["losses"] and rest["eval_losses"] == full["eval_losses"]
    a, b = read_peft(tmp_path / "a"), read_peft(tmp_path / "b")
    assert all(torch.equal(a.modules[n].B, b.modules[n].B) for n in a.modules)


def test_completion_only_masking(fx, tmp_path):
    tr, _ = mapping_data(tmp_path, "pc", repeat=1)
    ds = data.load(tr, fx / "models" / "llama")
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(fx / "models" / "llama" / "tokenizer.json"))
    for rec, ex in zip((json.loads(l) for l in tr.read_text().splitlines()), ds.examples):
        n_prompt = len(tok.encode(rec["prompt"], add_special_tokens=False).ids)
        assert not any(ex.mask[:n_prompt - 1])  # prompt tokens carry no loss
        assert all(ex.mask[n_prompt:])          # the completion (and its end token) does
    x, y = data.pack(ds, 32, ds.report["eos_id"], list(range(len(ds.examples))))
    labelled = {int(t) for t in y[y != -100]}
    prompt_only = set(tok.encode("Code for", add_special_tokens=False).ids)
    assert not (labelled & prompt_only)


def test_chat_masks_only_assistant_turns(fx, tmp_path):
    p = tmp_path / "chat.jsonl"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye"}]
    p.write_text(json.dumps({"messages": msgs}) + "\n")
    ds = data.load(p, fx / "models" / "llama")
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(fx / "models" / "llama" / "tokenizer.json"))
    ex = ds.examples[0]
    text = tok.decode([i for i, m in zip(ex.ids, ex.mask) if m], skip_special_tokens=False)
    assert "Hello there" in text and "Goodbye" in text and "Hi" not in text and "Be brief" not in text


def test_bad_data(fx, tmp_path, run_cli):
    m = fx / "models" / "llama"
    cases = {"empty.jsonl": ("", "empty"), "bad.jsonl": ('{"text": "ok"}\n{"text": oops}\n', "line 2: malformed JSON"),
             "noasst.jsonl": (json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n", "no assistant turn"),
             "fields.jsonl": (json.dumps({"foo": 1}) + "\n", "needs 'text'")}
    for name, (content, msg) in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(InputError, match=msg):
            data.load(tmp_path / name, m)
        code, _, err = run_cli("train", "--model", m, "--data", tmp_path / name, "-o", tmp_path / f"{name}.out")
        assert code == 2 and name in err and msg.split(":")[-1].strip() in err and "Traceback" not in err
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"text": "The quick brown fox jumps over the lazy dog. " * 20}) + "\n")
    ds = data.load(long, m)
    x, y = data.pack(ds, 16, ds.report["eos_id"], [0])
    assert ds.report["truncated"] == 1 and x.shape == (1, 16)


def test_bf16_gradient_checkpointing_and_cli(fx, tmp_path, run_cli):
    tr, ev = mapping_data(tmp_path)
    code, out, err = run_cli("train", "--model", fx / "models" / "mistral", "--data", tr, "--eval", ev, "-o", tmp_path / "o",
                             "--dtype", "bf16", "--gradient-checkpointing", "--max-steps", "12", "--seq-len", "48",
                             "--targets", "attention", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["eval_losses"][-1][1] < rep["eval_loss_initial"] and rep["lr"] == pytest.approx(default_lr(rep["model_parameters"])[0])
    assert all(n.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj") for n in read_peft(tmp_path / "o").modules)


def test_default_lr_is_ten_times_full_finetuning():
    lr, ft = default_lr(135_000_000)
    assert lr == pytest.approx(10 * ft) and 5e-4 < lr < 2e-3
    assert default_lr(7_000_000_000)[0] < lr


def test_plain_text_and_text_jsonl(fx, tmp_path):
    m = fx / "models" / "llama"
    (tmp_path / "a.txt").write_text("The quick brown fox.\n\nJumps over the lazy dog.\n\n\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "The quick brown fox."}) + "\n\n" + json.dumps({"text": "Jumps over the lazy dog."}) + "\n")
    a, b = data.load(tmp_path / "a.txt", m), data.load(tmp_path / "b.jsonl", m)
    assert [e.ids for e in a.examples] == [e.ids for e in b.examples] and len(a.examples) == 2
    assert all(all(e.mask) for e in a.examples)
    assert b.report["kinds"] == {"text": 2}


@pytest.mark.parametrize("arch,checkpointing", [("llama", False), ("mistral", True), ("qwen3", False)])
def test_loss_computes_only_what_the_labels_need(fx, arch, checkpointing):
    """_loss drops columns after the last label, runs the last block's MLP and the head only at
    labelled rows (padded to a bucket size): same loss and LoRA gradients as the full forward."""
    from loratools.train.loop import _loss, add_lora
    import torch.nn.functional as F

    model = load_model(fx / "models" / arch)
    model.gradient_checkpointing = checkpointing
    slots = add_lora(model, cfg(rank=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for s in slots.values():
            s.B.normal_(0, 0.05, generator=g)
    params = [p for s in slots.values() for p in (s.A, s.B)]
    x = torch.randint(0, 300, (3, 40), generator=g)
    for labelled in ([(0, 5), (1, 17), (2, 3), (2, 4)], [(1, 39)], [(0, 0)], []):
        y = torch.full_like(x, -100)
        for r, c in labelled:
            y[r, c] = int(x[r, c]) + 1
        ours = _loss(model, x, y)
        g_ours = torch.autograd.grad(ours, params, allow_unused=True)
        logits = model(x)[0]
        ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100, reduction="sum")
        g_ref = torch.autograd.grad(ref, params, allow_unused=True)
        assert ours.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6), labelled
        for a, b in zip(g_ours, g_ref):
            a = torch.zeros_like(b) if a is None else a
            b = torch.zeros_like(a) if b is None else b
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), labelled


def test_optimizer_steps_equal_plain_autograd_and_adamw(fx):
    """Two steps of loratools' training step (hand-written backward, row-selected loss, its
    AdamW) move every LoRA factor as plain autograd on the full forward with PyTorch's
    default AdamW does."""
    from loratools.train.loop import _loss, add_lora, make_optimizer
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 300, (2, 24), generator=g)
    y = torch.where(torch.rand(2, 24, generator=g) < 0.4, torch.randint(0, 300, (2, 24), generator=g), -100)
    params = []
    for ours in (True, False):
        model = load_model(fx / "models" / "qwen2")
        slots = add_lora(model, cfg(rank=4))
        ps = [p for s in slots.values() for p in (s.A, s.B)]
        opt = make_optimizer(ps, 1e-2) if ours else torch.optim.AdamW(ps, lr=1e-2, foreach=False)
        if not ours:
            for p in model.parameters():  # a trainable-looking base: PyTorch's own linear and autograd
                p.requires_grad_(False)
            for m in model.linear_modules().values():
                m.weight.requires_grad_(True)
        for _ in range(2):
            if ours:
                loss = _loss(model, x, y)
            else:
                logits = model(x)[0]
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100, reduction="sum")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        params.append([p.detach().clone() for p in ps])
    for a, b in zip(*params):
        assert (a - b).abs().max() <= 2e-4  # round-off through Adam's g/√v: ~2e-5 here; a wrong gradient moves ~lr = 1e-2


def test_prompt_ending_in_a_space_keeps_the_completion_whole(fx, tmp_path):
    """'Answer: ' + 'Paris' encodes the space and the word as one token; it ends inside the
    completion, so it carries loss (it used to carry none, leaving only the end token)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(fx / "models" / "llama" / "tokenizer.json"))
    p = tmp_path / "pc.jsonl"
    recs = [{"prompt": "The code for apple is ", "completion": "river stone"}, {"prompt": "Say hel", "completion": "lo there"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ds = data.load(p, fx / "models" / "llama")
    for r, ex in zip(recs, ds.examples):
        joint = tok.encode(r["prompt"] + r["completion"], add_special_tokens=False)
        assert ex.ids[:-1] == joint.ids  # the text as the model will see it, then the end token
        learned = tok.decode([i for i, m in zip(ex.ids[:-1], ex.mask[:-1]) if m])
        assert r["completion"].split()[-1] in learned and learned.strip().endswith(r["completion"].strip()[-3:])
        first = next(k for k, (a, b) in enumerate(joint.offsets) if b > len(r["prompt"]))
        assert ex.mask[first] and not any(ex.mask[:first]) and ex.mask[-1]


def test_packing_keeps_the_last_partial_row(fx, tmp_path):
    tr, _ = mapping_data(tmp_path, "pc", repeat=1)
    ds = data.load(tr, fx / "models" / "llama")
    want = sum(sum(e.mask) for e in ds.examples)
    longest = max(len(e.ids) for e in ds.examples)
    for seq in (longest, longest + 3, 33, 256):  # no example truncated; the stream rarely fills the last row
        x, y = data.pack(ds, seq, ds.report["eos_id"], list(range(len(ds.examples))))
        assert int((y != -100).sum()) == want, seq  # every loss token is somewhere in the rows


def test_data_files_as_real_tools_write_them(fx, tmp_path):
    """A byte-order mark, U+2028 inside a JSON string (legal unescaped), CRLF line ends, and a
    chat template that tests `tools` as Qwen/Llama-3.1 templates do."""
    m = tmp_path / "model"
    shutil.copytree(fx / "models" / "llama", m)
    cfgp = m / "tokenizer_config.json"
    c = json.loads(cfgp.read_text())
    c["chat_template"] = ("{% if tools %}TOOLS{% endif %}{% for m in messages %}{% if m.tool_calls %}x{% endif %}"
                          "<{{ m.role }}>{{ m.content }}</s>\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    cfgp.write_text(json.dumps(c))
    p = tmp_path / "d.jsonl"
    recs = [{"text": "a\u2028b"}, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo\u2029"}]}]
    p.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in recs).encode())
    ds = data.load(p, m)
    assert ds.report["kinds"] == {"text": 1, "chat": 1} and ds.report["examples"] == 2


def test_resume_refuses_other_options_and_a_fresh_start_drops_old_metrics(fx, tmp_path):
    tr, _ = mapping_data(tmp_path)
    m = fx / "models" / "llama"
    train(m, tr, tmp_path / "a", cfg(epochs=2, checkpoint_every=3, stop_after=4), log=lambda s: None)
    for change in (dict(rank=4), dict(lr=1e-3), dict(seq_len=40), dict(max_steps=3)):
        with pytest.raises(Exception) as e:
            train(m, tr, tmp_path / "a", cfg(epochs=2, checkpoint_every=3, **change), resume=True, log=lambda s: None)
        assert type(e.value).__name__ == "IncompatibleError" and "other options" in str(e.value), change
    # interrupted before any checkpoint, then started again: the metrics are the new run's only
    train(m, tr, tmp_path / "b", cfg(epochs=2, checkpoint_every=1000, stop_after=3), log=lambda s: None)
    import shutil as _sh
    _sh.rmtree(tmp_path / "b.train" / "checkpoints", ignore_errors=True)
    rep = train(m, tr, tmp_path / "b", cfg(max_steps=5, checkpoint_every=1000), log=lambda s: None)
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, rep["steps"] + 1))


def test_seq_len_that_truncates_every_label_is_refused(fx, tmp_path):
    p = tmp_path / "pc.jsonl"
    p.write_text("".join(json.dumps({"prompt": "a long prompt with many words before the answer " * 3,
                                     "completion": " yes"}) + "\n" for _ in range(4)))
    with pytest.raises(InputError, match="no token carries loss once examples are truncated"):
        train(fx / "models" / "llama", p, tmp_path / "o", cfg(seq_len=8, max_steps=2), log=lambda s: None)


def test_chat_template_renders_as_transformers_does(fx, tmp_path):
    transformers = pytest.importorskip("transformers")
    m = tmp_path / "model"
    shutil.copytree(fx / "models" / "llama", m)
    cfgp = m / "tokenizer_config.json"
    c = json.loads(cfgp.read_text())
    c["chat_template"] = ("{% if tools is not none %}T{% endif %}{% for x in messages %}<{{ x.role }}>{{ x.content }}"
                          "{% if x.meta is defined %}{{ x.meta | tojson }}{% endif %}</s>\n{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    cfgp.write_text(json.dumps(c))
    msgs = [{"role": "user", "content": "héllo <b>", "meta": {"zeta": "<a & b>", "alpha": "é"}},
            {"role": "assistant", "content": "ok"}]
    ours = data.ChatTemplate(m).render(msgs)
    theirs = transformers.AutoTokenizer.from_pretrained(str(m)).apply_chat_template(msgs, tokenize=False)
    assert ours == theirs, (ours, theirs)


def test_fresh_start_will_not_clear_an_input_inside_the_work_folder(fx, tmp_path):
    tr, _ = mapping_data(tmp_path)
    work = tmp_path / "run.train"
    work.mkdir()
    shutil.copyfile(tr, work / "data.jsonl")
    with pytest.raises(OutputError, match="lies inside the run's work folder"):
        train(fx / "models" / "llama", work / "data.jsonl", tmp_path / "run", cfg(max_steps=1), log=lambda s: None)
    assert (work / "data.jsonl").is_file()
