"""The benchmark's own machinery: the built-in sampler it uses where k-diffusion is missing (the GPU
machine), per-scale step counts and the JSON report that tools/device_check.sh reads."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from accdiffusion.lab import bench, reference
from accdiffusion.method.settings import AccDiffusionSettings

PROMPT = "a red fox sitting in tall grass under a blue sky"


def eps_model(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
    """Depends on x and on the timestep, so a wrong c_in or σ → t map changes the output."""
    return torch.sin(3 * x + t.reshape(-1, 1, 1, 1) / 97)


def test_builtin_denoiser_matches_k_diffusion():
    from k_diffusion.external import DiscreteEpsDDPMDenoiser

    alphas = reference.sd_alphas_cumprod()
    theirs = DiscreteEpsDDPMDenoiser(eps_model, alphas, quantize=False)
    ours = reference.EpsDenoiser(eps_model, alphas)
    for n in (1, 2, 7, 50):
        assert torch.allclose(ours.get_sigmas(n), theirs.get_sigmas(n), rtol=1e-6, atol=0)
    # inside the schedule, below its smallest σ, above its largest, and exactly on its levels
    sigmas = torch.cat([torch.rand(200) * 14.5 + 0.03, torch.tensor([1e-4, 20.0]), theirs.sigmas[::97]])
    assert torch.allclose(ours.sigma_to_t(sigmas), theirs.sigma_to_t(sigmas), rtol=0, atol=1e-3)
    t = torch.rand(200) * 999
    assert torch.allclose(ours.t_to_sigma(t), theirs.t_to_sigma(t), rtol=1e-6, atol=0)
    x, sigma = torch.randn(3, 4, 8, 8), torch.tensor([0.05, 1.0, 12.0])
    assert torch.allclose(ours(x, sigma), theirs(x, sigma), rtol=1e-5, atol=1e-5)


def test_builtin_euler_matches_k_diffusion():
    from k_diffusion import sampling

    denoiser = reference.EpsDenoiser(eps_model, reference.sd_alphas_cumprod())
    sigmas = denoiser.get_sigmas(6)
    x = torch.randn(2, 4, 8, 8) * sigmas[0]
    expected = sampling.sample_euler(denoiser, x, sigmas, disable=True)
    assert torch.allclose(reference.sample_euler(denoiser, x, sigmas), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(reference.sample_euler(denoiser, x, sigmas[1:]), expected, atol=1e-2)


def test_builtin_host_runs_the_passes_as_the_k_diffusion_host(tokenizer):
    """First pass and a tiled hires pass (both window modes) on the reference host give the same
    latents with the built-in sampler as with k-diffusion's."""
    unet = reference.build_unet("sd1", seed=3)
    hosts = [reference.Host(unet, tokenizer, builtin_sampler=builtin) for builtin in (False, True)]
    outs = []
    for host in hosts:
        latent, recorder = reference.first_pass(host, [PROMPT], "", (16, 16), 3, seed=0)
        tiled = [reference.hires_pass(host, latent, [PROMPT], "", recorder,
                                      AccDiffusionSettings(enabled=True, window_mode=mode), (32, 32), 2, 0.6,
                                      seed=0).latent for mode in ("overlap", "shifted")]
        outs.append([latent, *tiled])
    for ours, theirs in zip(outs[1], outs[0]):
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(outs[1][1], outs[1][2], atol=1e-3)  # the modes differ: the check can tell


def test_builtin_sampler_refuses_what_it_does_not_serve(tokenizer):
    unet = reference.build_unet("sd1", seed=3)
    with pytest.raises(ValueError, match="v_prediction needs k-diffusion"):
        reference.Host(unet, tokenizer, v_prediction=True, builtin_sampler=True)
    host = reference.Host(unet, tokenizer, builtin_sampler=True)
    with pytest.raises(ValueError, match="needs k-diffusion"):
        reference.first_pass(host, [PROMPT], "", (16, 16), 2, seed=0, sampler="DPM++ 2M")


def test_auto_sampler_falls_back_where_k_diffusion_does_not_import(monkeypatch):
    assert bench.use_builtin_sampler("auto") is False  # installed here
    assert bench.use_builtin_sampler("builtin") is True
    monkeypatch.setitem(sys.modules, "k_diffusion", None)  # `import k_diffusion` raises ImportError
    assert bench.use_builtin_sampler("auto") is True
    assert bench.use_builtin_sampler("k-diffusion") is False


def test_steps_per_scale():
    assert bench.steps_per_scale("50,20", [2, 4]) == [50, 20]
    assert bench.steps_per_scale("4", [2, 3, 4]) == [4, 4, 4]
    for bad in ("50,20", "0"):
        with pytest.raises(ValueError, match="one per scale"):
            bench.steps_per_scale(bad, [2, 3, 4])
    with pytest.raises(SystemExit):
        bench.main(["--scales", "2,3", "--steps", "1,2,3"])


def test_bench_json_report(tmp_path, capsys):
    path = tmp_path / "bench.json"
    bench.main(["--base", "16", "--scales", "2,3", "--steps", "2,1", "--first-steps", "1",
                "--modes", "overlap,shifted", "--sampler", "builtin", "--json", str(path)])
    report = json.loads(path.read_text())
    assert list(tmp_path.iterdir()) == [path]  # written whole, no temporary left
    assert report["sampler"] == "built-in Euler" and report["model"] == "sd1"
    first = report["first_pass"]
    assert first["steps"] == 1 and first["recording_ratio"] == pytest.approx(first["recording_s"] / first["plain_s"])
    assert [(r["scale"], r["mode"], r["steps"]) for r in report["runs"]] == [
        (2, "overlap", 2), (2, "shifted", 2), (3, "overlap", 1), (3, "shifted", 1)]
    for run in report["runs"]:
        assert [st["dilation"] for st in run["stages"]] == list(range(2, run["scale"] + 1))
        for stage in run["stages"]:
            s, steps = stage["dilation"], run["steps"]
            assert stage["steps"] == steps and stage["formula"] == ((2 * s - 1) ** 2 + s * s) * steps
            local = (2 * s - 1) ** 2 if run["mode"] == "overlap" else s * s
            assert stage["window_evals"] + stage["skipped_evals"] == (local + s * s) * steps
            assert stage["tile_batch"] >= 1
        assert run["window_evals"] == sum(st["window_evals"] for st in run["stages"])
        assert run["window_grain"] == 1  # the setting's default, recorded with the figures
        # padded windows count at their padded size: at least every latent pixel once per evaluated step
        assert all(st["latent_pixels"] >= st["latent"][0] * st["latent"][1] for st in run["stages"])
    printed = capsys.readouterr().out
    assert "2x shifted, grain 1 -> 256x256 px, 2 steps per stage" in printed and "sampler built-in Euler" in printed


def test_dit_recording_cost_counts_the_recorded_late_blocks():
    """--recording-cost-dit counts the blocks the recorder takes (the last quarter: Flux's single
    blocks, SD 3.5's last joint blocks) with their image × all-keys product: SD 3.5 medium's added
    FLOPs are 6 recorded blocks × one block's image-query scores against every key (4096 × 4429 ×
    1536, two FLOPs each)."""
    flux = bench.dit_recording_cost("flux-dev")
    assert (flux["recorded_blocks"], flux["blocks"]) == (15, 57)
    assert "added_flops_per_single_block" in flux and "added_flops_per_first_block" not in flux
    sd35 = bench.dit_recording_cost("sd3.5-medium")
    assert (sd35["recorded_blocks"], sd35["blocks"]) == (6, 24)
    assert sd35["recording_added_flops"] == pytest.approx(6 * 2 * 4096 * (4096 + 333) * 1536, rel=1e-3)
    assert 0 < sd35["share"] < 1


@pytest.mark.parametrize("name, recorded, blocks", [
    ("z-image", 8, 30), ("qwen-image", 15, 60), ("klein-4b", 7, 25), ("klein-9b", 8, 32), ("anima", 7, 28),
    ("ernie-image", 9, 36)])
def test_dit_recording_cost_on_neo_families(name, recorded, blocks):
    """Neo's families at full size: the recorder takes the last quarter (Klein's are single-stream
    blocks), and what it adds per block is the image queries against the keys the block's softmax
    runs over — Z-Image's 83 caption tokens padded to 96 plus 4096 image tokens, 3840 wide; Anima's
    512 text keys only (a cross-attention), 2048 wide."""
    cost = bench.dit_recording_cost(name)
    assert (cost["recorded_blocks"], cost["blocks"]) == (recorded, blocks)
    assert ("added_flops_per_single_block" in cost) == name.startswith("klein")
    if name == "z-image":
        assert cost["added_flops_per_first_block"] == pytest.approx(2 * 4096 * (96 + 4096) * 3840, rel=1e-3)
        # the refiners are part of the model's work, not recorded
        assert cost["model_flops"] > 30 * cost["flops_per_first_block"] + 2 * cost["flops_per_noise_refiner_block"]
    if name == "anima":
        assert cost["added_flops_per_first_block"] == pytest.approx(2 * 4096 * 512 * 2048, rel=1e-3)
    if name == "ernie-image":  # the image first, 76 text tokens after it, no padding; 4096 wide
        assert cost["added_flops_per_first_block"] == pytest.approx(2 * 4096 * (4096 + 76) * 4096, rel=1e-3)
    assert 0 < cost["share"] < 0.05  # issue 24's bound: recording within 5 % of the first pass


# narrow stand-ins of the encoders' shapes: the explicit head width (4 × 32 ≠ 64) is Qwen3's
TINY_QWEN3 = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
              "intermediate_size": 160}
TINY_QWEN2 = dict(TINY_QWEN3, head_dim=16)  # Qwen2's classes take the head width from the width


def llm_layer_flops(tokens: int, size: dict[str, int]) -> int:
    """One decoder layer: q, k, v, o and the three gated-MLP matrices per token, two FLOPs a
    multiply-add, plus QKᵀ and attention × V over all query heads."""
    width, inner = size["hidden_size"], size["num_attention_heads"] * size["head_dim"]
    kv = size["num_key_value_heads"] * size["head_dim"]
    linear = 2 * tokens * (2 * width * inner + 2 * width * kv + 3 * width * size["intermediate_size"])
    return linear + 2 * 2 * tokens * tokens * inner


@pytest.mark.parametrize("name, sizes, depth, needed", [
    ("z-image", TINY_QWEN3, 36, 35), ("klein-4b", TINY_QWEN3, 36, 27), ("klein-9b", TINY_QWEN3, 36, 27),
    ("qwen-image", TINY_QWEN2, 28, 28), ("anima", TINY_QWEN3, 28, 28), ("ernie-image", TINY_QWEN3, 26, 25)])
def test_llm_encoding_cost_counts_the_layers_neo_runs(name, sizes, depth, needed):
    """--llm-cost times layers of an encoder of the family's shape (here narrow) and scales them
    to the full depth, which Neo runs whatever layer its engine reads, and to the layers up to that
    one (Z-Image's second-to-last output: 35; Klein's inputs of layer 27: 27). The FLOPs follow
    the layer formula in the tokens (linear part × 2, attention products × 4 at twice the tokens);
    the rotary table's one small product per call is counted once, hence rel=1e-3."""
    for tokens in (16, 32):
        cost = bench.llm_encoding_cost(name, tokens, layers_timed=2, sizes=sizes)
        assert (cost["layers"], cost["needed_layers"]) == (depth, needed)
        assert cost["flops"] == pytest.approx(depth * llm_layer_flops(tokens, sizes), rel=1e-3)
        assert cost["flops_needed"] == pytest.approx(needed * llm_layer_flops(tokens, sizes), rel=1e-3)
        assert cost["seconds"] == pytest.approx(cost["seconds_per_layer"] * depth)


def test_llm_encoder_shapes_and_tokens_are_neos():
    """The shapes are the configs' in Neo's backend/huggingface folders (checked against them where
    ACCDIFFUSION_NEO_DIR names a Neo checkout), and a 75-token prompt reaches each encoder with its
    engine's template: Z-Image 8 more tokens, Qwen-Image 39, Klein padded to 512, Anima none,
    Ernie-Image its one start token."""
    import os
    from pathlib import Path

    assert {n: e.tokens for n, e in bench.LLM_ENCODERS.items()} == {
        "z-image": 83, "klein-4b": 512, "klein-9b": 512, "qwen-image": 114, "anima": 75, "ernie-image": 76}
    neo = os.environ.get("ACCDIFFUSION_NEO_DIR")
    if not neo:
        return
    folders = {"z-image": "Tongyi-MAI/Z-Image-Turbo", "klein-4b": "black-forest-labs/FLUX.2-klein-4B",
               "klein-9b": "black-forest-labs/FLUX.2-klein-9B", "qwen-image": "Qwen/Qwen-Image",
               "ernie-image": "baidu/ERNIE-Image"}
    for name, folder in folders.items():
        config = json.loads((Path(neo) / "backend/huggingface" / folder / "text_encoder/config.json").read_text())
        config = config.get("text_config", config)
        assert {k: config[k] for k in bench.LLM_ENCODERS[name].shape if k in config} == {
            k: v for k, v in bench.LLM_ENCODERS[name].shape.items() if k in config}, name


def test_t5_encoding_cost_scales_one_timed_layer_to_the_depth():
    """--t5-cost times layers of a T5-shaped encoder and scales them to T5-XXL's 24 (here a narrow
    stand-in): the FLOPs are those of 24 layers (4 attention projections + 3 gated-FFN matrices per
    token, two FLOPs a multiply-add, plus the attention products)."""
    sizes = {"d_model": 64, "d_kv": 8, "num_heads": 8, "d_ff": 160}
    cost = bench.t5_encoding_cost(tokens=16, layers_timed=2, sizes=sizes)
    linear = 2 * 16 * (4 * 64 * 64 + 3 * 64 * 160)
    scores = 2 * 2 * 16 * 16 * 64  # QKᵀ and attention × V
    assert cost["layers"] == 24
    assert cost["flops"] == pytest.approx(24 * (linear + scores), rel=1e-6)
    assert cost["seconds"] == pytest.approx(cost["seconds_per_layer"] * 24)
