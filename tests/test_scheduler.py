import pytest
import torch

from stepvideo_core.scheduler import (
    PRESETS,
    denoise_sigmas,
    flow_matching_loss,
    guided_velocity,
    make_noise,
    sample_euler,
    sample_training_times,
    step_video_sigmas,
)


def test_sigmas_match_the_reference_table():
    s = step_video_sigmas(50, 13.0)
    assert len(s) == 51 and s[0] == 0 and s[-1] == 1
    torch.testing.assert_close(s[:6], torch.tensor([0, 0.001567, 0.003195, 0.004886, 0.006644, 0.008475]), atol=1e-6, rtol=0)
    torch.testing.assert_close(s[-4:], torch.tensor([0.546512, 0.648649, 0.790323, 1.0]), atol=1e-6, rtol=0)
    s = step_video_sigmas(10, 17.0)
    torch.testing.assert_close(s[:6], torch.tensor([0, 0.006494, 0.014493, 0.02459, 0.037736, 0.055556]), atol=1e-6, rtol=0)
    torch.testing.assert_close(s[-4:], torch.tensor([0.12069, 0.190476, 0.346154, 1.0]), atol=1e-6, rtol=0)
    assert torch.all(s[1:] > s[:-1])


def official_settings_table(readme: str) -> dict[str, tuple[tuple[int, int], float, float]]:
    """The official README's 'Best-of-Practice Inference settings' rows: model -> ((min, max) steps, cfg, shift)."""
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("Step-Video-T2V") and "-" in cells[1]:
            low, high = (int(n) for n in cells[1].split("-"))
            rows[cells[0]] = ((low, high), float(cells[2]), float(cells[3]))
    return rows


def test_presets_are_the_official_recommended_settings():
    """The presets against the official README's recommendations (needs STEPVIDEO_REFERENCE): steps within the
    recommended range, the same guidance scale and time shift."""
    from tests.reference_impl import reference_root

    table = official_settings_table((reference_root() / "README.md").read_text(encoding="utf-8"))
    recommended = {"standard": table["Step-Video-T2V"], "turbo": table["Step-Video-T2V-Turbo (Inference Step Distillation)"]}
    for name, ((low, high), cfg, shift) in recommended.items():
        preset = PRESETS[name]
        assert low <= preset.steps <= high and (preset.cfg, preset.shift) == (cfg, shift), (name, preset)
    # the standard preset takes the most steps the README recommends, as its example command does
    assert PRESETS["standard"].steps == recommended["standard"][0][1]


def test_denoise_takes_the_tail_of_a_longer_schedule():
    full = step_video_sigmas(20, 13.0)
    torch.testing.assert_close(denoise_sigmas(10, 13.0, 0.5), full[10:])
    torch.testing.assert_close(denoise_sigmas(10, 13.0, 1.0), step_video_sigmas(10, 13.0))
    with pytest.raises(ValueError):
        denoise_sigmas(10, 13.0, 0.0)


def test_euler_with_the_exact_velocity_field_lands_on_the_data():
    """For one data point the true flow is v(x, s) = (data - x) / (1 - s); Euler is exact on straight paths."""
    data = torch.randn(1, 3, 4, 2, 2)
    noise = make_noise(data.shape, seed=3)
    out = sample_euler(lambda x, t: (data - x) / (1 - t.view(-1, 1, 1, 1, 1)), noise, step_video_sigmas(7, 13.0))
    torch.testing.assert_close(out, data, atol=1e-5, rtol=1e-5)


def test_partial_denoise_starts_on_the_interpolation_path():
    data, noise = torch.randn(1, 2, 3), torch.randn(1, 2, 3)
    sigmas = denoise_sigmas(4, 13.0, 0.5)
    seen = []

    def v(x, t):
        seen.append(x.clone())
        return (data - x) / (1 - t.view(-1, 1, 1))

    out = sample_euler(v, noise, sigmas, latents=data)
    torch.testing.assert_close(seen[0], sigmas[0] * data + (1 - sigmas[0]) * noise)
    torch.testing.assert_close(out, data, atol=1e-5, rtol=1e-5)


def test_guidance_batches_cond_and_uncond_in_one_call():
    calls = []

    def v(x, t):
        calls.append(x.shape[0])
        return torch.cat([torch.full_like(x[:1], 2.0), torch.full_like(x[1:], 0.5)])

    out = guided_velocity(v, 9.0)(torch.zeros(1, 3), torch.zeros(1))
    assert calls == [2]
    torch.testing.assert_close(out, torch.full((1, 3), 0.5 + 9.0 * (2.0 - 0.5)))


def test_seed_is_honoured():
    assert torch.equal(make_noise((2, 3), 7), make_noise((2, 3), 7))
    assert not torch.equal(make_noise((2, 3), 7), make_noise((2, 3), 8))


def test_callback_reports_progress_and_can_cancel():
    steps_called = []

    def cb(done, total, x, denoised):
        steps_called.append((done, total))
        if done == 3:
            raise KeyboardInterrupt

    model_calls = []
    with pytest.raises(KeyboardInterrupt):
        sample_euler(lambda x, t: model_calls.append(1) or torch.zeros_like(x), torch.zeros(1, 2), step_video_sigmas(10, 13.0), callback=cb)
    assert steps_called == [(1, 10), (2, 10), (3, 10)] and len(model_calls) == 3


def test_nan_velocity_is_a_clear_error():
    with pytest.raises(FloatingPointError, match="NaN"):
        sample_euler(lambda x, t: torch.full_like(x, float("nan")), torch.zeros(1, 2), step_video_sigmas(3, 13.0))


def test_training_times_mix_uniform_and_shifted_draws():
    t = sample_training_times(6, torch.Generator().manual_seed(3), 13.0)
    u = torch.rand(6, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(t[0::2], u[0::2], rtol=0, atol=0)
    torch.testing.assert_close(t[1::2], 1 - 13.0 * u[1::2] / (1 + 12.0 * u[1::2]))  # SD3 shift, mirrored


def test_flow_matching_loss_is_the_velocity_error_at_the_interpolated_point():
    g = torch.Generator().manual_seed(0)
    data, noise = torch.randn(3, 2, 4, 2, 2, generator=g), torch.randn(3, 2, 4, 2, 2, generator=g)
    t = torch.tensor([0.0, 0.25, 1.0])
    seen = {}

    def model(x, tt, scale):
        seen["x"], seen["t"] = x, tt
        return scale * torch.ones_like(x)

    per_sample = flow_matching_loss(model, data, {"scale": 0.5}, t, noise, reduce=False)
    torch.testing.assert_close(seen["x"][0], noise[0])
    torch.testing.assert_close(seen["x"][2], data[2])
    torch.testing.assert_close(seen["x"][1], 0.25 * data[1] + 0.75 * noise[1])
    want = torch.stack([((0.5 - (data[i] - noise[i])) ** 2).mean() for i in range(3)])
    torch.testing.assert_close(per_sample, want)
    torch.testing.assert_close(flow_matching_loss(model, data, {"scale": 0.5}, t, noise), want.mean())
    exact = flow_matching_loss(lambda x, tt: data - noise, data, {}, t, noise, reduce=False)
    assert torch.equal(exact, torch.zeros(3))
    weight = torch.rand(3, 2, 1, 2, 2, generator=g)
    weighted = flow_matching_loss(model, data, {"scale": 0.5}, t, noise, reduce=False, weight=weight)
    want = torch.stack([((0.5 - (data[i] - noise[i])) ** 2 * weight[i]).mean() for i in range(3)])
    torch.testing.assert_close(weighted, want)
