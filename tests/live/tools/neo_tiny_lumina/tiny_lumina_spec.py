"""Sizes of the tiny random Lumina 2 checkpoint for Forge Neo, and the component folder Neo loads it with.

One place for both sides: ``make_tiny_lumina.py`` builds the checkpoint from these sizes, and the
``neo_tiny_lumina`` preload (``preload.py`` beside this file) recognises the checkpoint by them and writes the
folder. Standard library only: the preload imports this before Neo has set anything up.

Lumina 2 in Neo (2.26): ``huggingface_guess`` detects it in the branch it shares with Z-Image (the DiT has
``cap_embedder.1.weight`` and a k-norm in ``noise_refiner.0``); the two are told apart by the DiT width read from
``cap_embedder.1.weight`` (``model_list.Lumina2`` wants 2304, ``ZImage`` 3840, the tiny Z-Image type 256: the tiny
Lumina is 64 wide). The caption width is the text encoder's hidden size (Gemma-2 2B: 2304, Z-Image's Qwen3: 2560).
The engine (``backend/diffusion_engine/lumina.py``) loads every component from ``model_list.Lumina2``'s repo
folder ``backend/huggingface/neta-art/Neta-Lumina``: ``Gemma2Model`` (built by ``backend.nn.llm.llama.Gemma2_2B``
from a hard-coded dataclass), ``GemmaTokenizerFast`` (its ``tokenizer.json`` is unpacked by Neo at start from
``backend/huggingface/neta.tokenizer.json.xz``), the FLUX.1 VAE (16 latent channels) and a flow scheduler.
"""

import os
import sys

sys.path.append(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # tests/live/tools: the shared part
import neo_tiny_common as common  # noqa: E402

NAME = "tiny-lumina"
REAL_REPO = ("neta-art", "Neta-Lumina")          # below Neo's backend/huggingface
TINY_MARK = "forge_tiny_random"                  # text_encoder/config.json flag: build a tiny Gemma-2

# Gemma-2 text encoder (real: 2304 wide, 9216 MLP, 26 layers, 8 heads x 256, 4 KV heads). The vocabulary stays
# the real 256 000 tokens so that every id of Neo's real tokenizer is valid; at 16 wide that is 4.1 M values.
GEMMA = {"hidden_size": 16, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1, "head_dim": 8, "query_pre_attn_scalar": 8, TINY_MARK: True}
GEMMA_VOCAB = 256000

# FLUX.1-layout VAE (real: 128/256/512/512 channels, 2 layers per block); 16 latent channels, 8x down.
VAE = {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1}

# NextDiT with the Lumina 2 options (no Z-Image modulation, no pad tokens, time scale 1). What Neo's detection
# reads from the shapes ...
DIT_DETECTED = {"patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": GEMMA["hidden_size"], "n_layers": 2,
                "qk_norm": True}
# ... and what it sets only for the real width 2304, so the tiny type supplies it (real: 24 heads x 96, 8 KV heads,
# rope axes 32/32/32 over 300/512/512, theta 10 000, FFN x 4; 2 refiner layers is NextDiT's default).
DIT_EXTRA = {"n_heads": 2, "n_kv_heads": 1, "n_refiner_layers": 2, "axes_dims": [8, 12, 12],
             "axes_lens": [300, 512, 512], "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0}
DIT = {**DIT_DETECTED, **DIT_EXTRA}

# Exact DiT shapes (keys below model.diffusion_model.) that only the tiny checkpoint has.
_HEAD = DIT["dim"] // DIT["n_heads"]
SHAPES = {
    "x_embedder.weight": (DIT["dim"], DIT["patch_size"] ** 2 * DIT["in_channels"]),
    "cap_embedder.1.weight": (DIT["dim"], DIT["cap_feat_dim"]),
    "layers.0.attention.qkv.weight": ((DIT["n_heads"] + 2 * DIT["n_kv_heads"]) * _HEAD, DIT["dim"]),
    "noise_refiner.0.adaLN_modulation.1.weight": (4 * DIT["dim"], DIT["dim"]),
    "t_embedder.mlp.0.weight": (DIT["dim"], 256),
}
ABSENT = ("cap_pad_token", "x_pad_token")        # Z-Image's pad tokens; Lumina 2 has none


def neo_repo_dir(neo_dir):
    return os.path.join(neo_dir, "backend", "huggingface", *REAL_REPO)


def write_repo(neo_dir, dst, tokenizer_dir=None):
    """Write the component folder Neo loads the tiny checkpoint from: Neo's Neta-Lumina folder with the text
    encoder and VAE configs shrunk (the text encoder's marked tiny), the scheduler as is, no transformer/ folder (Neo
    builds the DiT from the detected config) and tokenizer/ a link to Neo's own (or tokenizer_dir). Returns dst."""
    return common.write_component_repo(neo_repo_dir(neo_dir), dst, "Gemma2Model", lambda real: {**real, **GEMMA},
                                       VAE, tokenizer_dir)
