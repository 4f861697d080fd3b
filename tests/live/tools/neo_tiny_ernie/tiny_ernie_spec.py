"""Sizes of the tiny random Ernie-Image checkpoint for Forge Neo, and the component folder Neo loads it with.

One place for both sides: ``make_tiny_ernie.py`` builds the checkpoint from these sizes, and the ``neo_tiny_ernie``
preload (``preload.py`` beside this file) recognises the checkpoint by them and writes the folder. Standard library
only: the preload imports this before Neo has set anything up.

Ernie-Image in Neo (2.26): ``huggingface_guess`` detects it by the key ``layers.0.mlp.linear_fc2.weight`` alone and
returns ``{"image_model": "ernie"}`` without reading any size, so Neo builds ``backend/nn/ernie.py``'s
``ErnieImageModel`` with its constructor defaults (the real 8B: hidden 4096, 32 heads, 36 layers, text width 3072).
The tiny type therefore supplies the whole constructor config through ``unet_extra_config``. The engine
(``backend/diffusion_engine/ernie.py``, ``use_shift``) loads every other component from ``model_list.ErnieImage``'s
repo folder ``backend/huggingface/baidu/ERNIE-Image``: ``Mistral3Model`` (built by
``backend.nn.llm.llama.Ministral3_3B`` from a hard-coded dataclass; text part only, no vision tower), the
``PixtralProcessor`` tokenizer (its ``tokenizer.json`` is unpacked by Neo at start from
``backend/huggingface/ernie.tokenizer.json.xz``), the FLUX.2 VAE (32 latent channels packed 2 x 2 -> 128, a latent
batch-norm) and a flow scheduler (shift 3).
"""

import os
import sys

sys.path.append(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # tests/live/tools: the shared part
import neo_tiny_common as common  # noqa: E402

NAME = "tiny-ernie"
REAL_REPO = ("baidu", "ERNIE-Image")             # below Neo's backend/huggingface
TINY_MARK = "forge_tiny_random"                  # text_encoder/config.json flag: build a tiny Ministral-3

# Ministral-3 text encoder, the "text_config" of the Mistral3 config (real: 3072 wide, 9216 MLP, 26 layers,
# 32 heads x 128, 8 KV heads). The vocabulary stays the real 131 072 tokens so that every id of Neo's real
# tokenizer is valid; at 32 wide that is 4.2 M values.
MINISTRAL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "head_dim": 16}
MINISTRAL_VOCAB = 131072

# FLUX.2 VAE (real: 128/256/512/512 channels, 2 layers per block); 32 latent channels, 8x down, packed 2 x 2.
VAE = {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1}

# ErnieImageModel (real: see the module docstring; rope axes 32/48/48 over head_dim 128, theta 256, patch 1 on the
# 128 packed channels). Neo's detection reads none of it, so all of it is the tiny type's extra config. The text
# width differs from the hidden width, so the DiT keeps its text projection (as the real 3072 -> 4096).
DIT = {"hidden_size": 64, "num_attention_heads": 2, "num_layers": 2, "ffn_hidden_size": 128, "in_channels": 128,
       "out_channels": 128, "patch_size": 1, "text_in_dim": MINISTRAL["hidden_size"], "rope_theta": 256,
       "rope_axes_dim": [8, 12, 12], "eps": 1e-6}
assert sum(DIT["rope_axes_dim"]) == DIT["hidden_size"] // DIT["num_attention_heads"]


def shapes(dit):
    """Exact DiT shapes (keys below model.diffusion_model.) for a constructor config: the tiny type matches only
    the tiny ones (plus ABSENT: the layer count is exact too)."""
    h = dit["hidden_size"]
    return {
        "x_embedder.proj.weight": (h, dit["in_channels"], dit["patch_size"], dit["patch_size"]),
        "text_proj.weight": (h, dit["text_in_dim"]),
        "layers.0.self_attention.to_q.weight": (h, h),
        "layers.0.self_attention.norm_q.weight": (h // dit["num_attention_heads"],),
        f"layers.{dit['num_layers'] - 1}.mlp.linear_fc2.weight": (h, dit["ffn_hidden_size"]),
        "adaLN_modulation.1.weight": (6 * h, h),
        "final_linear.weight": (dit["patch_size"] ** 2 * dit["out_channels"], h),
    }


SHAPES = shapes(DIT)
ABSENT = (f"layers.{DIT['num_layers']}.mlp.linear_fc2.weight",)


def neo_repo_dir(neo_dir):
    return os.path.join(neo_dir, "backend", "huggingface", *REAL_REPO)


def text_encoder_config(real):
    """The real Mistral3 config with its text part shrunk and the whole config marked tiny (Neo hands the top-level
    dict to Ministral3_3B). The vision part is left as is: Neo builds no vision tower for Ernie-Image."""
    return {**real, "text_config": {**real["text_config"], **MINISTRAL}, TINY_MARK: True}


def write_repo(neo_dir, dst, tokenizer_dir=None):
    """Write the component folder Neo loads the tiny checkpoint from: Neo's ERNIE-Image folder with the text
    encoder and VAE configs shrunk (the text encoder's marked tiny), the scheduler as is, no transformer/ folder (Neo
    builds the DiT from the guessed config) and tokenizer/ a link to Neo's own (or tokenizer_dir). Returns dst."""
    src = neo_repo_dir(neo_dir)
    index = common.read_json(os.path.join(src, "model_index.json"))
    assert index["vae"] == ["diffusers", "AutoencoderKLFlux2"], index
    return common.write_component_repo(src, dst, "Mistral3Model", text_encoder_config, VAE, tokenizer_dir)
