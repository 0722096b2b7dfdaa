"""Text data, tokenizers, LM tasks and models: the embedded corpus, files and saved HF datasets,
document splits, blocks and padding, masked-LM masking, perplexity, taps on unmodified HF models,
and the one-line errors for bad input."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import make_cfg

from kdrun.config import validate
from kdrun.data.text import blocks, corpus, split_documents, stdlib_docstrings, text_files
from kdrun.engine.loop import evaluate
from kdrun.errors import ConfigError
from kdrun.features import FeatureTaps, check_paths
from kdrun.models.language import causal_lm, init_from_teacher, masked_lm
from kdrun.tasks.base import IGNORE
from kdrun.tasks.language import CausalLM, MaskedLM

TEXT = "\n\n".join(f"Paragraph {i} says something about topic {i % 7} and returns the value {i * 3}." for i in range(60))


def small_corpus(tmp_path, **options):
    path = tmp_path / "notes.txt"
    path.write_text(TEXT)
    settings = {"reader": "files", "paths": [str(path)], "block_size": 8, "tokenizer": {"kind": "byte"}, **options}
    return corpus(str(tmp_path / "cache"), **settings)


@pytest.mark.slow  # parses the whole standard library (seconds on a quiet machine)
def test_stdlib_corpus_is_real_text_in_a_fixed_order():
    documents = stdlib_docstrings(min_chars=200, max_chars=50_000)
    hashes = [hashlib.sha256(d.encode()).hexdigest() for d in documents]
    assert hashes == sorted(hashes)
    assert 10 < len(documents) and sum(map(len, documents)) <= 50_000
    assert all(len(d) >= 200 for d in documents)
    assert sum(" the " in d for d in documents) > len(documents) / 2  # English prose


def test_documents_split_disjointly_and_blocks_pack_or_pad():
    documents = [f"doc {i}" for i in range(20)]
    parts = split_documents(documents, 0.1, 0.2, seed=0)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [14, 2, 4]
    assert sorted(sum(parts.values(), [])) == sorted(documents)
    assert parts == split_documents(documents, 0.1, 0.2, seed=0)
    ids, mask = blocks([[5, 6, 7], [8]], block_size=3, pack=True, eos_id=1, pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [1, 8, 1]] and mask.shape == (2, 0)
    ids, mask = blocks([[5, 6, 7], [8]], block_size=3, pack=False, eos_id=1, pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 1, 0]]  # a lone end-of-document token would predict nothing
    assert mask.tolist() == [[True] * 3, [True, True, False]]


def test_text_files_jsonl_and_a_saved_hf_dataset(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"text number {i}"}) for i in range(3)))
    assert text_files([str(jsonl)], text_key="body") == sorted([f"text number {i}" for i in range(3)],
                                                              key=lambda t: hashlib.sha256(t.encode()).hexdigest())
    with pytest.raises(ConfigError, match="text_key"):
        text_files([str(jsonl)])
    from datasets import Dataset

    Dataset.from_dict({"text": TEXT.split("\n\n")}).save_to_disk(str(tmp_path / "hf"))
    splits = corpus(str(tmp_path / "cache"), reader="hf_disk", path=str(tmp_path / "hf"), block_size=16,
                    tokenizer={"kind": "bpe", "vocab_size": 300})
    assert splits.num_classes == 300 and splits.input_shape == (16,)
    assert splits.text.corpus["documents"] == {"train": 48, "val": 6, "test": 6}
    assert len(splits.train) and len(splits.val) and len(splits.test)


def test_corpus_caches_tokens_and_records_the_hash(tmp_path):
    first = small_corpus(tmp_path)
    again = small_corpus(tmp_path)
    assert first.text.corpus == again.text.corpus and len(first.text.corpus["sha256"]) == 64
    assert torch.equal(first.train.tensors[0], again.train.tensors[0])
    tokenizer = first.text.tokenizer
    assert tokenizer.decode(tokenizer.encode(["héllo"])[0]) == "héllo"


def test_pretrained_tokenizer_directory(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from kdrun.data.text import train_bpe

    backend = train_bpe([TEXT], 300)
    saved = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", mask_token="<mask>")
    saved.save_pretrained(str(tmp_path / "tok"))
    splits = small_corpus(tmp_path, tokenizer={"kind": "pretrained", "path": str(tmp_path / "tok")})
    assert splits.text.tokenizer.vocab_size == 300 and splits.text.tokenizer.mask_id == 2
    with pytest.raises(ConfigError, match="not a directory"):
        small_corpus(tmp_path, tokenizer={"kind": "pretrained", "path": str(tmp_path / "missing")})


def test_empty_and_too_small_corpora_are_config_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ConfigError, match="empty"):
        corpus(str(tmp_path / "c"), reader="files", paths=[str(tmp_path / "empty.txt")])
    (tmp_path / "tiny.txt").write_text("a\n\nb\n\nc")
    with pytest.raises(ConfigError, match="too small"):
        corpus(str(tmp_path / "c"), reader="files", paths=[str(tmp_path / "tiny.txt")], block_size=64,
               tokenizer={"kind": "byte"})


def test_perplexity_is_exp_of_the_mean_token_cross_entropy(tmp_path):
    splits = small_corpus(tmp_path)
    task = CausalLM()
    torch.manual_seed(0)
    model = causal_lm(splits.num_classes, splits.input_shape, layers=1, heads=1, width=8)
    loader = torch.utils.data.DataLoader(splits.test, batch_size=4)
    metrics = evaluate(model, loader, task, torch.device("cpu"))
    ids = splits.test.tensors[0]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert metrics["loss"] == pytest.approx(ce.item(), rel=1e-4)
    assert metrics["ppl"] == pytest.approx(math.exp(ce.item()), rel=1e-4)
    assert 0 <= metrics["acc"] <= 100


class FakeData:
    def __init__(self, splits):
        self.text, self.name = splits.text, "notes"


def test_masked_lm_masks_a_fixed_share_80_10_10_and_scores_only_those(tmp_path):
    splits = small_corpus(tmp_path, block_size=40)
    task = MaskedLM(mask_prob=0.15)
    task.prepare(FakeData(splits))
    ids = splits.train.tensors[0][:64]
    torch.manual_seed(0)
    batch = task.batch((ids, torch.zeros(len(ids), 0, dtype=torch.bool)))
    positions = batch.extra["positions"]
    assert positions.shape == (64, 6)  # round(0.15 * 40)
    masked = batch.inputs["input_ids"]
    assert torch.equal(batch.labels, ids.gather(1, positions))
    chosen = masked.gather(1, positions)
    share_masked = (chosen == task.text.tokenizer.mask_id).float().mean().item()
    share_kept = (chosen == batch.labels).float().mean().item()
    assert 0.7 < share_masked < 0.9 and 0.05 < share_kept < 0.2
    untouched = torch.ones_like(ids, dtype=torch.bool).scatter(1, positions, False)
    assert torch.equal(masked[untouched], ids[untouched])
    logits, labels = task.scored(torch.randn(64, 40, splits.num_classes), batch)
    assert logits.shape == (64 * 6, splits.num_classes) and torch.equal(labels, batch.labels.reshape(-1))
    torch.manual_seed(0)
    assert torch.equal(task.batch((ids, torch.zeros(64, 0, dtype=torch.bool))).inputs["input_ids"], masked)  # reseeded: same
    with torch.no_grad():  # evaluation: masks from the tokens, the same every time
        first, second = task.batch((ids, torch.zeros(64, 0, dtype=torch.bool))), task.batch((ids, torch.zeros(64, 0, dtype=torch.bool)))
    assert torch.equal(first.extra["positions"], second.extra["positions"])


def test_masked_lm_needs_a_mask_token(tmp_path):
    splits = small_corpus(tmp_path)
    splits.text.tokenizer.mask_id = None
    with pytest.raises(ConfigError, match="mask token"):
        MaskedLM().prepare(FakeData(splits))


def test_hidden_states_and_attention_probabilities_are_taps_on_unmodified_models():
    torch.manual_seed(0)
    for build in (causal_lm, masked_lm):
        model = build(50, (6,), layers=3, heads=2, width=8, attention="eager").eval()
        paths = ["stage0", "stage2", "last_stage", "stage1:attention", "last_stage:attention"]
        check_paths(model, paths, "student")
        with FeatureTaps(model, paths) as taps:
            out = model(input_ids=torch.randint(0, 50, (2, 6)), output_hidden_states=True)
            for path, index in (("stage0", 0), ("stage2", 2), ("last_stage", 3)):
                reference = out.hidden_states[index]
                if build is causal_lm and index == 3:  # GPT-2's last hidden state is after the final LayerNorm
                    reference = model.transformer.ln_f(taps[path])
                assert torch.allclose(taps[path] if index < 3 or build is masked_lm else model.transformer.ln_f(taps[path]),
                                      reference, atol=1e-5)
            for path in ("stage1:attention", "last_stage:attention"):
                probs = taps[path]
                assert probs.shape == (2, 2, 6, 6) and torch.allclose(probs.sum(-1), torch.ones(2, 2, 6), atol=1e-5)
    sdpa = causal_lm(50, (6,), layers=1, heads=1, width=8)
    with pytest.raises(ConfigError, match="attention=eager"), FeatureTaps(sdpa, ["stage1:attention"]):
        sdpa(input_ids=torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(ConfigError, match="blocks"):
        check_paths(sdpa, ["stage3"], "student")


def test_student_initialised_from_every_other_teacher_layer():
    torch.manual_seed(0)
    teacher, student = masked_lm(40, (8,), layers=4, width=8), masked_lm(40, (8,), layers=2, width=8)
    assert init_from_teacher(student, teacher) == [0, 2]
    for mine, theirs in ((0, 0), (1, 2)):
        for a, b in zip(student.bert.encoder.layer[mine].parameters(), teacher.bert.encoder.layer[theirs].parameters()):
            assert torch.equal(a, b)
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    with pytest.raises(ConfigError, match="shapes"):
        init_from_teacher(masked_lm(40, (8,), layers=2, width=16, heads=2), teacher)


LM = ["dataset=lm_stdlib", "task=causal_lm", "teacher=gpt2_tiny", "student=gpt2_student", "loss=token_kd"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["task=masked_lm"], "is a causal LM but task=MaskedLM needs a masked one"),
    (["teacher=bert_tiny"], "is a masked LM but task=CausalLM"),
    (["dataset=mnist1d"], "needs a text dataset"),
    (["teacher=hf_pretrained", "teacher.path=/nonexistent/model"], "teacher.path=/nonexistent/model does not exist"),
    (["dataset.source.tokenizer.kind=pretrained", "+dataset.source.tokenizer.path=/nowhere"], "tokenizer.path=/nowhere"),
    (["student.positions=32"], "block_size=64 is beyond student.positions=32"),
    (["dataset=lm_files", "dataset.source.paths=[/no/such.txt]"], "/no/such.txt does not exist"),
    (["strategy=sequence", "strategy.prompt_tokens=64"], "strategy.prompt_tokens=64"),
    (["strategy=on_policy", "strategy.lmbda=2"], "strategy.lmbda=2"),
    (["strategy=ensemble"], "strategy=ensemble does not work with language models"),
    (["strategy=self"], "strategy=self does not work with language models"),
    (["strategy=unlabeled"], "strategy=unlabeled does not work with language models"),
    (["strategy=online"], "strategy=online does not work with language models"),
    (["task=masked_lm", "teacher=bert_tiny", "student=bert_student", "strategy=sequence"], "needs task=causal_lm"),
])
def test_bad_lm_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        validate(make_cfg(*LM, *overrides))


def test_optuna_minimises_perplexity_and_maximises_accuracy():
    import importlib.resources

    from hydra import compose, initialize_config_dir

    from kdrun.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(importlib.resources.files("kdrun.conf")), version_base="1.3"):
        classification = compose(config_name="train", overrides=["hparams_search=optuna"], return_hydra_config=True)
        language = compose(config_name="train", overrides=["hparams_search=optuna", "experiment=lm_tiny"],
                           return_hydra_config=True)
    assert (classification.optimize_metric, classification.hydra.sweeper.direction) == ("student.best_val_acc", "maximize")
    assert (language.optimize_metric, language.hydra.sweeper.direction) == ("student.best_val_ppl", "minimize")


def test_teacher_and_student_with_different_vocabularies_are_refused():
    from kdrun.distiller import check_recipe
    from kdrun.losses.recipe import build_recipe

    recipe = build_recipe({"kd": {"weight": 1.0, "_target_": "kdrun.losses.tokens.ForwardKL"}})
    with pytest.raises(ConfigError, match="different vocabularies"):
        check_recipe(recipe, causal_lm(50, (8,), layers=1, width=8, heads=1), causal_lm(60, (8,), layers=1, width=8, heads=1))


def test_a_pretrained_model_directory_loads_locally_and_must_fit_the_data(tmp_path):
    from kdrun.models.language import pretrained

    torch.manual_seed(0)
    saved = causal_lm(50, (16,), layers=1, heads=1, width=8)
    saved.save_pretrained(str(tmp_path / "model"))
    loaded = pretrained(50, (16,), path=str(tmp_path / "model"))
    ids = torch.randint(0, 50, (2, 16))
    assert torch.allclose(loaded(input_ids=ids).logits, saved.eval()(input_ids=ids).logits, atol=1e-6)
    with pytest.raises(ConfigError, match="predicts 50 tokens but the dataset's tokenizer has 60"):
        pretrained(60, (16,), path=str(tmp_path / "model"))
    with pytest.raises(ConfigError, match="block_size=32 is beyond"):
        pretrained(50, (32,), path=str(tmp_path / "model"))
    with pytest.raises(ConfigError, match="no config.json"):
        pretrained(50, (16,), path=str(tmp_path))


def test_on_policy_batches_keep_the_prompt_and_score_the_students_samples():
    from kdrun.losses.recipe import build_recipe
    from kdrun.strategies.on_policy import OnPolicyDistiller

    torch.manual_seed(0)
    student, teacher = causal_lm(30, (10,), layers=1, heads=1, width=8), causal_lm(30, (10,), layers=1, heads=1, width=8)
    recipe = build_recipe({"jsd": {"weight": 1.0, "_target_": "kdrun.losses.tokens.GeneralizedJSD"}})
    distiller = OnPolicyDistiller(student, recipe, CausalLM(), teacher, lmbda=1.0, prompt_tokens=4, temperature=1.0)
    assert not distiller.fixed_inputs
    ids = torch.randint(0, 30, (3, 10))
    batch = CausalLM().batch((ids, torch.zeros(3, 0, dtype=torch.bool)))
    sampled = distiller.sampled(batch)
    new = sampled.inputs["input_ids"]
    assert new.shape == (3, 10) and torch.equal(new[:, :4], ids[:, :4]) and not torch.equal(new, ids)
    assert sampled.labels[:, :4].tolist() == ids[:, :4].tolist() and (sampled.labels[:, 4:] == IGNORE).all()
    with distiller:
        on_policy = distiller.step_outputs(batch, progress=0.5)
        evaluation = distiller.step_outputs(batch, progress=None)  # probes and evaluation keep the data
    assert (on_policy.labels == IGNORE).sum() == 3 * 6 and (evaluation.labels != IGNORE).all()


@pytest.mark.parametrize("experiment", ["lm_tiny", "distilbert_tiny", "tinybert_tiny"])
def test_lm_experiments_compose_and_validate(experiment):
    cfg = make_cfg(f"experiment={experiment}")
    validate(cfg)
    assert cfg.optimize_metric == "student.best_val_ppl" and cfg.dataset.name == "lm_stdlib"
    assert (cfg.task._target_.endswith("CausalLM")) == (experiment == "lm_tiny")
