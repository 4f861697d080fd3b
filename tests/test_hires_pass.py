import pytest
import torch

from accdiffusion.method.hires import stage_windows
from accdiffusion.method.prompts import ImagePromptPlan
from accdiffusion.lab.reference import first_pass, hires_pass
from accdiffusion.method.settings import AccDiffusionSettings
from accdiffusion.method.words import align_words, split_words

PROMPT = "a red-haired astronaut riding a horse on the moon"


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M", "Heun"])
@pytest.mark.parametrize("host_name", ["sd1_host", "sdxl_host"])
def test_two_stage_hires_pass_gives_finite_latents(request, host_name, sampler):
    host = request.getfixturevalue(host_name)
    latent, recorder = first_pass(host, [PROMPT, "a cat"], "blurry", (16, 24), 3, seed=3)
    result = hires_pass(host, latent, [PROMPT, "a cat"], "blurry", recorder,
                        AccDiffusionSettings(enabled=True, window_mode="overlap"), (48, 72), steps=2, denoise=0.6, seed=3,
                        sampler=sampler)
    assert [s.size for s in result.stages] == [(32, 48), (48, 72)]
    assert result.latent.shape == (2, 4, 48, 72)
    assert bool(torch.isfinite(result.latent).all())
    # each image got its own tile prompts from its own maps
    assert len(result.tile_prompts[0]) == 2 and len(result.tile_prompts[0][0]) == 9
    assert all(p in ("", "a cat", "cat", "a") for p in result.tile_prompts[0][1])
    prompt_words = {w.text for w in split_words(PROMPT)}
    assert all({w.text for w in split_words(p)} <= prompt_words for p in result.tile_prompts[0][0])
    for i, prompt in enumerate([PROMPT, "a cat"]):
        words = split_words(prompt)
        plan = ImagePromptPlan.build(words, align_words(words, host.context_ids(prompt), host.special_ids,
                                                        host.tokenize),
                                     recorder.maps(i), prompt, words, units=AccDiffusionSettings().prompt_units)
        windows = stage_windows(result.stages[0], (16, 24), AccDiffusionSettings(enabled=True, window_mode="overlap"))
        assert result.tile_prompts[0][i] == plan.tile_prompts((32, 48), windows, 0.3)


def test_same_seed_same_result_and_seed_matters(sd1_host):
    latent, recorder = first_pass(sd1_host, [PROMPT], "", (16, 16), 3, seed=5)
    run = lambda seed: hires_pass(sd1_host, latent, [PROMPT], "", recorder,
                                  AccDiffusionSettings(enabled=True, window_mode="overlap"), (32, 32), 2, 0.7, seed,
                                  sampler="Euler a").latent
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_unet_calls_follow_the_formula(sd1_host):
    latent, recorder = first_pass(sd1_host, [PROMPT], "", (16, 16), 2, seed=1)
    steps = 3
    result = hires_pass(sd1_host, latent, [PROMPT], "", recorder,
                        AccDiffusionSettings(enabled=True, window_mode="overlap", tile_batch_size=1), (48, 48), steps, 0.5, 1)
    for stage, stats in zip(result.stages, result.stage_stats):
        s = stage.dilation
        assert stats.steps == steps
        # evaluated + skipped (a branch whose weight is below ε) = the formula; ×2: cond + uncond rows
        assert stats.window_evals + stats.skipped_evals == ((2 * s - 1) ** 2 + s * s) * steps * 2
    # each distinct tile prompt is encoded once per job (the prompt and the negative "" already were)
    assert result.stage_encodes[0] == len(set(result.tile_prompts[0][0]) - {PROMPT, ""})
    assert result.stage_encodes[1] == len(set(result.tile_prompts[1][0]) - set(result.tile_prompts[0][0]) - {PROMPT, ""})


def test_method_toggles_change_the_result(sd1_host):
    latent, recorder = first_pass(sd1_host, [PROMPT], "", (16, 16), 3, seed=2)
    run = lambda **kw: hires_pass(sd1_host, latent, [PROMPT], "", recorder,
                                  AccDiffusionSettings(enabled=True, window_mode="overlap", **kw), (32, 32), 4, 0.5, 2).latent
    base = run()
    for change in ({"patch_prompts": False}, {"dilated_sampling": False},
                   {"window_interaction": False}, {"skip_residual": False}):
        assert not torch.allclose(run(**change), base), change
