"""Export to GGUF, llama.cpp's format (`gpt2 export --format gguf`), through the `gguf` package.

llama.cpp's `gpt2` architecture takes our tensors as they are (nn.Linear's (out, in) layout is
GGUF's (in, out) dims written the other way round): a renaming table, the hyper-parameters, and
GPT-2's byte-level BPE vocabulary and merges. 2-D weights are written in the chosen type
(f32, f16, bf16 or q8_0); LayerNorms and biases stay f32, as llama.cpp's own converter does.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from gpt2engine.errors import GPT2EngineError
from gpt2engine.loading.weights import dense_state_dict
from gpt2engine.model import GPT2
from gpt2engine.tokenizer import END_OF_TEXT, Tokenizer, read_vocabulary

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
# our parameter name (after "h.{i}.") -> llama.cpp's tensor name (after "blk.{i}.")
BLOCK_TENSORS = {
    "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
}
TOP_TENSORS = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm", "lm_head": "output"}


VOCABULARY_ROWS = ("wte.weight", "lm_head.weight")  # a padded vocabulary's (nanoGPT, llm.c) extra rows

def gguf_name(name: str) -> str:
    """`h.3.attn.c_attn.weight` -> `blk.3.attn_qkv.weight`; `wte.weight` -> `token_embd.weight`."""
    module, kind = name.rsplit(".", 1)
    if module.startswith("h."):
        _, layer, rest = module.split(".", 2)
        return f"blk.{layer}.{BLOCK_TENSORS[rest]}.{kind}"
    return f"{TOP_TENSORS[module]}.{kind}"


EXACT_GELU = ("llama.cpp's gpt2 computes GELU's tanh approximation where this checkpoint (nanoGPT's, or "
              "activation_function \"gelu\") uses the exact one: activations differ by up to 4.7e-4, so "
              "llama.cpp's outputs will be close to this model's, not the same")


def check_exportable(model: GPT2, tokenizer: Tokenizer) -> list[str]:
    """Refuse what llama.cpp's gpt2 cannot run; return what it will run only approximately."""
    c = model.config
    if c.scale_attn_by_inverse_layer_idx or not c.scale_attn_weights:
        raise GPT2EngineError("GGUF export: llama.cpp's gpt2 has no scale_attn_by_inverse_layer_idx or "
                              "unscaled attention; this checkpoint uses one of them")
    if tokenizer.vocab_size > c.vocab_size:
        raise GPT2EngineError(f"GGUF export: the tokenizer has {tokenizer.vocab_size} tokens and the "
                              f"model only {c.vocab_size} rows")
    return [EXACT_GELU] if c.activation_function == "gelu" else []


def vocabulary(tokenizer: Tokenizer) -> tuple[list[str], list[int], list[str]]:
    """Token strings in id order (GPT-2's byte-level alphabet), their GGUF types, the merges: read
    again from the tokenizer's files (the tokenizer keeps only what encoding needs)."""
    import gguf

    vocab = read_vocabulary(tokenizer.folder)
    tokens = [""] * tokenizer.vocab_size
    for text, token_id in {**vocab.tokens, **vocab.added}.items():
        tokens[token_id] = text
    types = [gguf.TokenType.CONTROL if t == END_OF_TEXT else gguf.TokenType.NORMAL for t in tokens]
    return tokens, [int(t) for t in types], vocab.merges


def export_gguf(model: GPT2, tokenizer: Tokenizer, path: str | Path, weight_type: str = "f32") -> list[str]:
    """Write `path` (never over an existing file; written beside it, then renamed into place) ->
    what llama.cpp will compute only approximately (for the caller to say)."""
    try:
        import gguf
    except ImportError:
        raise GPT2EngineError("GGUF export needs the gguf package: pip install 'gpt2engine[gguf]'") from None
    if weight_type not in GGUF_TYPES:
        raise GPT2EngineError(f"GGUF weight type must be one of {', '.join(GGUF_TYPES)}, got {weight_type!r}")
    caveats = check_exportable(model, tokenizer)
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise GPT2EngineError(f"{path} already exists; refusing to overwrite it")
    c = model.config
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    quant = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}.get(weight_type)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".gpt2engine-") as scratch:
            staged = Path(scratch) / path.name
            writer = gguf.GGUFWriter(str(staged), "gpt2")
            writer.add_name(path.stem)
            writer.add_context_length(c.n_positions)
            writer.add_embedding_length(c.n_embd)
            writer.add_feed_forward_length(c.mlp_width)
            writer.add_block_count(c.n_layer)
            writer.add_head_count(c.n_head)
            writer.add_layer_norm_eps(c.layer_norm_epsilon)
            writer.add_file_type(file_types[weight_type])
            tokens, types, merges = vocabulary(tokenizer)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre("gpt-2")
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            writer.add_token_merges(merges)
            if tokenizer.eot_id is not None:
                for add in (writer.add_bos_token_id, writer.add_eos_token_id):
                    add(tokenizer.eot_id)
            for name, tensor in dense_state_dict(model, model.dtype).items():
                if name in VOCABULARY_ROWS:  # llama.cpp wants a row per token: padding left out
                    tensor = tensor[: tokenizer.vocab_size]
                data = tensor.detach().float().cpu().numpy()
                if quant is not None and data.ndim == 2:
                    writer.add_tensor(gguf_name(name), gguf.quants.quantize(data, quant), raw_dtype=quant)
                else:
                    writer.add_tensor(gguf_name(name), data)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            os.link(staged, path)  # fails, rather than replaces, if the path appeared meanwhile
    except OSError as error:
        raise GPT2EngineError(f"{path}: cannot write the GGUF file ({error.strerror})") from None
    return caveats
