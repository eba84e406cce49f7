"""Checkpoint loaders without the real model: HF folders (Llama, Qwen2 with biases) against
transformers, llama.cpp's Q/K permutation, and clear errors for bad sources."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from services.modelserver.engine.base import EngineUnavailableError
from services.modelserver.torch_engine import TorchEngine, TorchEngineConfig
from services.modelserver.torch_engine.forward_batch import SeqSlice, build_forward_batch
from services.modelserver.torch_engine.gguf_loader import unpermute_qk
from services.modelserver.torch_engine.model import KVCache, LlamaModel
from services.modelserver.torch_engine.weights import CheckpointError, load_checkpoint


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """What convert_hf_to_gguf.py does to Q/K rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute():
    w = torch.randn(3 * 8, 5)
    assert torch.equal(unpermute_qk(llama_cpp_permute(w, 3), 3), w)
    assert not torch.equal(llama_cpp_permute(w, 3), w)


def tiny_hf_model(kind: str, folder) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    common: dict[str, Any] = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
    model: Any
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=False))
        with torch.no_grad():  # random init leaves biases at zero; make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_()
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=True))
    model.eval()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_hf_folder_matches_transformers_with_paged_chunked_attention(kind, tmp_path):
    ref = tiny_hf_model(kind, tmp_path)
    args, tensors = load_checkpoint(str(tmp_path))
    assert args.attention_bias == (kind == "qwen2") and args.tie_embeddings == (kind == "llama")
    model = LlamaModel(args, tensors, torch.float32, max_positions=256)
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        want = ref(torch.tensor([ids])).logits[0]
    # 4-token pages run the plain-torch path, 16-token ones the C++ kernels (when built)
    for bs, table in ((4, [5, 2, 7, 0, 11, 3, 4, 6, 8, 10]), (16, [2, 0, 1])):  # scattered pages on purpose
        kv = KVCache.allocate(args, num_blocks=12, block_size=bs, dtype=torch.float32)
        got = []
        # chunked prefill (17 + 20 tokens) then three single-token decode steps
        for start, end in ((0, 17), (17, 37), (37, 38), (38, 39), (39, 40)):
            batch = build_forward_batch([SeqSlice(ids[start:end], start, table, True)], block_size=bs)
            batch.logits_rows = torch.arange(end - start)
            got.append(model.forward(batch, kv))
        assert torch.allclose(torch.cat(got), want, atol=1e-4, rtol=1e-4), bs


def test_missing_and_malformed_sources_fail_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        load_checkpoint(str(bad))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(str(empty))
    (empty / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="not supported"):
        load_checkpoint(str(empty))
    (empty / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(str(empty))


def test_folder_with_missing_tensor_names_it(tmp_path):
    tiny_hf_model("llama", tmp_path)
    from safetensors.torch import load_file, save_file

    (path,) = tmp_path.glob("*.safetensors")
    shard = load_file(str(path))
    del shard["model.layers.1.mlp.down_proj.weight"]
    save_file(shard, str(path))
    with pytest.raises(CheckpointError, match="layers.1.down"):
        load_checkpoint(str(tmp_path))


def test_engine_start_with_bad_source_is_unavailable(run, tmp_path):
    engine = TorchEngine("x", str(tmp_path / "missing.gguf"), TorchEngineConfig(dtype="float32"))
    with pytest.raises(EngineUnavailableError, match="missing.gguf"):
        run(engine.start())
    assert not engine.ready


def test_config_validation_and_pool_sizing():
    with pytest.raises(ValueError):
        TorchEngineConfig(dtype="float16").validate()
    with pytest.raises(ValueError):
        TorchEngineConfig(max_running=0).validate()
    assert TorchEngineConfig(kv_cache_blocks=0, kv_cache_bytes=1000).num_blocks(300) == 3
    assert TorchEngineConfig(kv_cache_blocks=7).num_blocks(300) == 7
