"""Export as a Hugging Face checkpoint (jaxexit.text.export): exact round trips at every ramp, transformers'
PyTorch classes reading the directory, and one clear error for each kind of bad directory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import sst2_parity_sentences
from jaxexit import EarlyExitModel
from jaxexit.cli import export as export_cli
from jaxexit.exits.types import RampOutputs
from jaxexit.text import export
from jaxexit.text.config import EncoderConfig
from jaxexit.text.hf_import import CheckpointError

TOL = 1e-4


def _tiny(arch="bert", seed=1, **fields) -> EarlyExitModel:
    sizes = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                 max_position_embeddings=64, num_labels=3)
    if arch == "roberta":
        sizes.update(pad_token_id=1, type_vocab_size=1)
    cfg = EncoderConfig(arch=arch, **{**sizes, **fields})
    return EarlyExitModel.from_config(cfg, seed=seed)


def _batch(cfg: EncoderConfig) -> dict:
    rng = np.random.default_rng(0)
    lengths = np.array([12, 5, 9, 3])
    mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(3, cfg.vocab_size, size=(4, 12)), cfg.pad_token_id).astype(np.int32)
    types = ((np.arange(12)[None] >= 2) & (mask == 1) & (cfg.type_vocab_size > 1)).astype(np.int32)
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


def _torch_inputs(batch, arch):
    import torch

    inputs = {k: torch.from_numpy(v).long() for k, v in batch.items()}
    if arch == "roberta":
        inputs.pop("token_type_ids")
    return inputs


def jax_tree(tree):
    import jax

    return jax.tree_util.tree_map(np.asarray, tree)


def _assert_same_params(a: EarlyExitModel, b: EarlyExitModel) -> None:
    import jax

    flat_a, flat_b = (jax.tree_util.tree_flatten_with_path(m.params) for m in (a, b))
    assert flat_a[1] == flat_b[1]
    for (path, x), (_, y) in zip(flat_a[0], flat_b[0]):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny first-token model with an LTE head, exported with a calibration table."""
    model = _tiny(lte=True)
    outputs = RampOutputs(np.random.default_rng(1).normal(size=(3, 20, 3)).astype(np.float32),
                          np.zeros((3, 20), np.float32))
    table = export.Calibration(outputs, np.arange(20) % 3, "validation")
    out = model.save_pretrained(tmp_path_factory.mktemp("export") / "tiny", task="mnli", calibration=table,
                                extra={"scheme": "alternate"})
    return model, out, table


# ---- round trips ---------------------------------------------------------------------------------
def test_round_trip_is_exact_at_every_ramp(exported):
    model, out, table = exported
    back = EarlyExitModel.from_pretrained(out)
    assert back.config == model.config and back.has_lte
    batch = _batch(model.config)
    np.testing.assert_array_equal(back.ramp_logits(batch), model.ramp_logits(batch))
    _assert_same_params(back, model)  # the LTE head included
    read = export.read_table(out)
    np.testing.assert_array_equal(read.outputs.logits, table.outputs.logits)
    np.testing.assert_array_equal(read.labels, table.labels)
    hf = json.loads((out / "config.json").read_text())
    assert hf["id2label"] == {"0": "entailment", "1": "neutral", "2": "contradiction"}
    assert hf["early_exit"]["task"] == "mnli" and hf["early_exit"]["scheme"] == "alternate"
    assert hf["architectures"] == ["BertForSequenceClassification"]


def test_round_trip_of_a_mean_model_with_a_shared_pooler(tmp_path):
    model = _tiny(ramp_input="mean", ramp_pooler="shared")
    back = export.load_pretrained(export.save_pretrained(model, tmp_path / "m"))
    batch = _batch(model.config)
    np.testing.assert_array_equal(back.ramp_logits(batch), model.ramp_logits(batch))


def test_round_trip_of_albert_shared_layers(tmp_path):
    model = _tiny("albert", embedding_size=16, num_hidden_layers=4, num_hidden_groups=2)
    back = export.load_pretrained(export.save_pretrained(model, tmp_path / "m"))
    assert back.config == model.config
    _assert_same_params(back, model)


def test_tensor_names_are_transformers_and_documented(exported):
    from safetensors import safe_open

    _, out, _ = exported
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())
    assert {"bert.embeddings.word_embeddings.weight", "bert.encoder.layer.2.output.LayerNorm.weight",
            "bert.pooler.dense.weight", "classifier.weight", "classifier.bias", "early_exit.ramps.0.classifier.weight",
            "early_exit.ramps.2.pooler.dense.bias", "early_exit.lte.dense.weight"} <= names
    assert not any(n.startswith("early_exit.ramps.3.") for n in names)


def test_other_settings_load_the_backbone_with_fresh_ramps(exported, caplog):
    model, out, _ = exported
    fresh = EarlyExitModel.from_pretrained(out, num_labels=2)
    assert "ramps start fresh" in caplog.text and fresh.num_labels == 2
    for name in ("embeddings", "layer"):
        np.testing.assert_equal(*(jax_tree(m.params["backbone"][name]) for m in (fresh, model)))


def test_reexport_replaces_and_foreign_directories_are_refused(exported, tmp_path):
    model, _, _ = exported
    out = export.save_pretrained(model, tmp_path / "again")
    export.save_pretrained(model, out, task="mnli")
    assert json.loads((out / "config.json").read_text())["early_exit"]["task"] == "mnli"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an exported model"):
        export.save_pretrained(model, tmp_path / "other")
    with pytest.raises(ValueError, match="reserved"):
        export.save_pretrained(model, tmp_path / "x", extra={"num_ramps": 2})


# ---- PyTorch ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_transformers_reads_the_final_ramp_of_a_first_token_model(arch, tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed")
    from transformers import AutoModelForSequenceClassification

    model = _tiny(arch)
    out = model.save_pretrained(tmp_path / arch)
    ref = AutoModelForSequenceClassification.from_pretrained(out).eval()
    batch = _batch(model.config)
    with torch.no_grad():
        logits = ref(**_torch_inputs(batch, arch)).logits.numpy()
    np.testing.assert_allclose(logits, model.ramp_logits(batch)[-1], atol=TOL)


def test_transformers_reads_every_layer_of_a_mean_model(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed")
    from transformers import AutoModel

    model = _tiny(ramp_input="mean")
    out = model.save_pretrained(tmp_path / "mean")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
    ref = AutoModel.from_pretrained(out, output_hidden_states=True, add_pooling_layer=False).eval()
    batch = _batch(model.config)
    with torch.no_grad():
        states = np.stack([h.numpy() for h in ref(**_torch_inputs(batch, "bert")).hidden_states])
    keep = batch["attention_mask"].astype(bool)
    assert np.abs(states[:, keep] - model.hidden_states(batch)[:, keep]).max() < TOL


# ---- a real run ---------------------------------------------------------------------------------------
def test_exported_run_round_trips_with_its_table_and_card(trained_minilm_run, tmp_path):
    out = export_cli.run([str(trained_minilm_run.path), str(tmp_path / "sst2"), "--limit", "48"])
    source, back = EarlyExitModel.from_run(trained_minilm_run.path), EarlyExitModel.from_pretrained(out)
    assert back.config == source.config and back.tokenizer.max_length == source.tokenizer.max_length
    batch = source.tokenize(sst2_parity_sentences())
    np.testing.assert_array_equal(back.tokenize(sst2_parity_sentences())["input_ids"], batch["input_ids"])
    np.testing.assert_array_equal(back.ramp_logits(batch), source.ramp_logits(batch))
    table = export.read_table(out)
    assert table.outputs.shape == (source.num_layers, 48, 2) and table.split == "validation"
    block = json.loads((out / "config.json").read_text())["early_exit"]
    assert block["scheme"] == "two_stage" and block["calibration"]["inputs"] == 48
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: jaxexit") and "| 6 |" in card and "Trade-off" in card


def test_export_command_without_table_and_push(trained_minilm_run, tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id, kw["private"]))

        def upload_folder(self, folder_path, repo_id, **kw):
            calls.append(("upload", repo_id, sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    out = export_cli.run([str(trained_minilm_run.path), str(tmp_path / "o"), "--no-table", "--push-to-hub", "me/m"])
    assert export.read_table(out) is None
    assert calls[0] == ("create", "me/m", False) and calls[1][0] == "upload"
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(calls[1][2])


def test_export_command_user_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        export_cli.run([str(tmp_path / "nothing"), str(tmp_path / "out")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err


# ---- bad directories ---------------------------------------------------------------------------------
def _copy(out, tmp_path):
    import shutil

    return shutil.copytree(out, tmp_path / "copy")


def _edit_block(directory, **changes):
    path = directory / "config.json"
    hf = json.loads(path.read_text())
    for key, value in changes.items():
        target = hf["early_exit"]
        *parents, leaf = key.split("__")
        for p in parents:
            target = target[p]
        target[leaf] = value
    path.write_text(json.dumps(hf))


def _edit_top(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _rewrite(directory, change):
    from safetensors.numpy import load_file, save_file

    file = directory / "model.safetensors"
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.mark.parametrize("damage,error,match", [
    (lambda d: (d / "model.safetensors").unlink(), FileNotFoundError, r"no model\.safetensors .* in .*copy"),
    (lambda d: _edit_block(d, num_ramps=4), CheckpointError, r"config\.json: early_exit\.num_ramps is 4"),
    (lambda d: _edit_block(d, encoder_config__ramp_input="max"), CheckpointError,
     r"config\.json: early_exit\.encoder_config: ramp_input must be one of"),
    (lambda d: _edit_block(d, encoder_config__num_hidden_layers=2, num_ramps=2), CheckpointError,
     r"config\.json: num_hidden_layers is 3 but early_exit\.encoder_config says 2"),
    (lambda d: _rewrite(d, lambda t: t.update({"early_exit.ramps.1.classifier.weight": np.zeros((3, 31), np.float32)})),
     CheckpointError, r"model\.safetensors: tensor 'early_exit\.ramps\.1\.classifier\.weight' has shape \(31, 3\)"),
    (lambda d: _rewrite(d, lambda t: t.update({"bert.encoder.layer.0.output.dense.bias": np.zeros(5, np.float32)})),
     CheckpointError, r"model\.safetensors: tensor 'bert\.encoder\.layer\.0\.output\.dense\.bias' has shape"),
    (lambda d: _rewrite(d, lambda t: t.update({"early_exit.ramps.3.classifier.bias": np.zeros(3, np.float32)})),
     CheckpointError, r"model\.safetensors: the weights hold early_exit\.ramps\.3\.classifier\.bias, .*num_ramps 3"),
    (lambda d: _rewrite(d, lambda t: t.pop("early_exit.lte.dense.bias")), CheckpointError,
     r"lack early_exit\.lte\.dense\.bias, which .*lte True"),
    (lambda d: _rewrite(d, lambda t: t.update({"early_exit.ramps.0.classifier.bias": np.zeros(3, np.int32)})),
     CheckpointError, r"tensor 'early_exit\.ramps\.0\.classifier\.bias' has shape \(3,\) \(int32\) .*\(float\)"),
    (lambda d: (d / "config.json").write_text("{\"model_type\": "), CheckpointError,
     r"copy/config\.json is not valid JSON"),
    (lambda d: _edit_block(d, format_version=2), CheckpointError, r"config\.json: early_exit\.format_version is 2"),
    (lambda d: _edit_block(d, ramp_input="max"), CheckpointError,
     r"config\.json: early_exit\.ramp_input is 'max' but early_exit\.encoder_config says 'cls'"),
    (lambda d: _edit_block(d, encoder_config=None), CheckpointError,
     r"config\.json: early_exit\.encoder_config is missing or not an object"),
    (lambda d: _edit_top(d, id2label={"0": "a", "1": "b"}), CheckpointError,
     r"config\.json: id2label \(num_labels\) is 2 but early_exit\.encoder_config says 3"),
])
def test_bad_directories_fail_with_one_clear_error(exported, tmp_path, damage, error, match):
    directory = _copy(exported[1], tmp_path)
    damage(directory)
    with pytest.raises(error, match=match):
        export.load_pretrained(directory)


@pytest.mark.parametrize("damage,error,match", [
    (lambda d: (d / "calibration.npz").unlink(), FileNotFoundError,
     r"copy/config\.json names the calibration table calibration\.npz, which is not there"),
    (lambda d: np.savez(d / "calibration.npz", logits=np.zeros((3, 20, 2), np.float32), labels=np.zeros(20),
                        meta=np.array("{}")), CheckpointError, r"calibration\.npz: logits have shape \(3, 20, 2\)"),
    (lambda d: (d / "calibration.npz").write_bytes(b"not a table"), CheckpointError,
     r"calibration\.npz: not a calibration table"),
])
def test_bad_calibration_tables_fail_with_one_clear_error(exported, tmp_path, damage, error, match):
    directory = _copy(exported[1], tmp_path)
    damage(directory)
    with pytest.raises(error, match=match):
        export.read_table(directory)


def test_plain_checkpoint_is_not_an_export(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="no early_exit block"):
        export.load_pretrained(tmp_path)

