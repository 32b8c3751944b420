"""HuggingFace models from configs (no weights, nothing downloaded), analyzed with no leaves, counts checked.

torch.fx cannot trace them (``**kwargs`` forwards, output dataclasses); the tracer falls back to
``torch.export`` at the input's shapes. The counts are checked against closed forms.
"""

import json

import pytest
import transformers
from click.testing import CliRunner

import dsrewrite
from dsrewrite.cli import cli
from dsrewrite.errors import ModelLoadError
from dsrewrite.load import load_model


def encoder_macs(layers: int, tokens: int, hidden: int, intermediate: int) -> int:
    """One transformer encoder stack: Q, K, V and output projections, attention scores and weighted sum, FFN."""
    projections = 4 * tokens * hidden * hidden
    attention = 2 * tokens * tokens * hidden
    ffn = 2 * tokens * hidden * intermediate
    return layers * (projections + attention + ffn)


def test_bert_base_counts_match_the_closed_form():
    config = transformers.BertConfig()  # BERT-base: 12 layers, 768 hidden, 3072 FFN
    tokens = 128
    analysis = dsrewrite.analyze_spec("transformers:BertModel", [(1, tokens)])
    assert not analysis.profile.untraced and analysis.trace.method == "export"
    expected = encoder_macs(12, tokens, 768, 3072) + 768 * 768  # + the pooler on the first token
    assert analysis.profile.macs == expected
    # BERT-base's published size: 110M parameters (109,482,240 with the pooler)
    assert analysis.profile.params == 109_482_240
    assert analysis.profile.input_shapes == [(1, tokens)] and analysis.profile.dtype == "int64"
    assert config.num_hidden_layers == 12


def test_vit_base_counts_match_the_closed_form_and_torchvisions_published_table():
    analysis = dsrewrite.analyze_spec("transformers:ViTModel")
    assert not analysis.profile.untraced
    tokens = (224 // 16) ** 2 + 1  # patches + [CLS]
    patch_embedding = 196 * 768 * 3 * 16 * 16
    expected = patch_embedding + encoder_macs(12, tokens, 768, 3072) + 768 * 768
    assert analysis.profile.macs == expected
    # torchvision's vit_b_16 (the same network with a 1000-class head instead of the pooler): 17.56 GFLOPS
    assert abs(analysis.profile.macs / 17.56e9 - 1) < 0.005
    assert [c.name for c in analysis.convs] == ["embeddings.patch_embeddings.projection"]


def test_config_file_spec_and_overrides(tmp_path):
    transformers.BertConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
                            intermediate_size=128).save_pretrained(tmp_path)
    loaded = load_model(f"transformers:{tmp_path}/config.json", {"num_hidden_layers": 2})
    assert type(loaded.model).__name__ == "BertModel" and loaded.model.config.num_hidden_layers == 2
    analysis = dsrewrite.analyze_spec(f"transformers:{tmp_path}/config.json", [(2, 32)])
    assert analysis.profile.macs == 2 * (encoder_macs(1, 32, 64, 128) + 64 * 64)


@pytest.mark.parametrize("spec,kwargs,message", [
    ("transformers:bert-base-uncased", {}, "no config for 'bert-base-uncased' in the local Hugging Face cache"),
    ("transformers:BertModel", {"num_hiden_layers": 2}, "did you mean num_hidden_layers"),
    ("transformers:missing/config.json", {}, "no such file"),
    ("transformers:", {}, "name a model"),
])
def test_bad_transformers_specs_get_one_line(spec, kwargs, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(spec, kwargs)


def test_cli_analyzes_a_transformers_spec():
    result = CliRunner().invoke(cli, ["analyze", "transformers:BertModel", "--arg", "num_hidden_layers=1",
                                       "--input-shape", "1,16", "--format", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output[result.output.index("{"):])
    assert doc["untraced"] == [] and doc["trace"]["method"] == "export" and doc["dtype"] == "int64"
    assert doc["totals"]["macs"] == encoder_macs(1, 16, 768, 3072) + 768 * 768
    assert doc["totals"]["peak_activation_bytes"] < 16 * 2**20, "parameters (over 100 MiB) are not activations"
