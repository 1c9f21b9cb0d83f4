import pytest
import torch

from stepvideo_core.lora import LoraError, attach, load_lora, new_trainable_lora, parse_lora, save_lora
from tests.builders import small_dit, text_inputs

HEADS, HEAD_DIM = 2, 16
DIM = HEADS * HEAD_DIM


def run(model):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 4, 2, 2, generator=g)
    llm, mask, clip = text_inputs(1, 5, (24, 12), (5,))
    with torch.no_grad():
        return model(x, torch.tensor([0.4]), llm, mask, clip)


def lowrank(out_f, in_f, rank=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, rank, generator=g) * 0.3, torch.randn(rank, in_f, generator=g) * 0.3


def merged_copy(model, deltas):
    merged = small_dit(layers=1)
    merged.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, delta in deltas.items():
            merged.get_submodule(name).weight += delta
    return merged


def test_separate_qkv_loras_land_in_the_per_head_interleaved_rows():
    model = small_dit(layers=1)
    parts = {p: lowrank(DIM, DIM, seed=i) for i, p in enumerate(("to_q", "to_k", "to_v"))}
    sd = {}
    for p, (up, down) in parts.items():
        sd[f"transformer.transformer_blocks.0.attn1.{p}.lora_B.weight"] = up
        sd[f"transformer.transformer_blocks.0.attn1.{p}.lora_A.weight"] = down
    lora = parse_lora(sd, model)
    assert lora.matched_modules == 1 and not lora.unmatched
    # independent construction of the fused delta, head by head
    delta = torch.zeros(3 * DIM, DIM)
    for h in range(HEADS):
        for slot, p in enumerate(("to_q", "to_k", "to_v")):
            up, down = parts[p]
            delta[3 * HEAD_DIM * h + slot * HEAD_DIM: 3 * HEAD_DIM * h + (slot + 1) * HEAD_DIM] = (
                up[h * HEAD_DIM:(h + 1) * HEAD_DIM] @ down
            )
    expected = run(merged_copy(model, {"transformer_blocks.0.attn1.wqkv": delta}))
    handle = attach(model, lora)
    torch.testing.assert_close(run(model), expected, atol=1e-5, rtol=1e-5)
    handle.detach()


def test_separate_kv_loras_fuse_into_cross_attention_wkv():
    model = small_dit(layers=1)
    (uk, dk), (uv, dv) = lowrank(DIM, DIM, seed=1), lowrank(DIM, DIM, seed=2)
    sd = {"diffusion_model.transformer_blocks.0.attn2.to_k.lora_up.weight": uk,
          "diffusion_model.transformer_blocks.0.attn2.to_k.lora_down.weight": dk,
          "diffusion_model.transformer_blocks.0.attn2.to_v.lora_up.weight": uv,
          "diffusion_model.transformer_blocks.0.attn2.to_v.lora_down.weight": dv}
    delta = torch.zeros(2 * DIM, DIM)
    for h in range(HEADS):
        rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        delta[2 * HEAD_DIM * h: 2 * HEAD_DIM * h + HEAD_DIM] = uk[rows] @ dk
        delta[2 * HEAD_DIM * h + HEAD_DIM: 2 * HEAD_DIM * (h + 1)] = uv[rows] @ dv
    expected = run(merged_copy(model, {"transformer_blocks.0.attn2.wkv": delta}))
    attach(model, parse_lora(sd, model))
    torch.testing.assert_close(run(model), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style", ["kohya", "peft", "comfy"])
def test_key_styles_and_alpha_scaling(style):
    model = small_dit(layers=1)
    up, down = lowrank(DIM, 4 * DIM)  # ff.net.2: in 4*DIM, out DIM
    alpha = 1.5
    if style == "kohya":
        base = "lora_unet_transformer_blocks_0_ff_net_2"
        sd = {f"{base}.lora_up.weight": up, f"{base}.lora_down.weight": down, f"{base}.alpha": torch.tensor(alpha)}
        scale = alpha / 3
    elif style == "peft":
        base = "base_model.model.transformer_blocks.0.ff.net.2"
        sd = {f"{base}.lora_B.weight": up, f"{base}.lora_A.weight": down}
        scale = 1.0
    else:
        base = "diffusion_model.transformer_blocks.0.ff.net.2"
        sd = {f"{base}.lora_up.weight": up, f"{base}.lora_down.weight": down, f"{base}.alpha": torch.tensor(alpha)}
        scale = alpha / 3
    expected = run(merged_copy(model, {"transformer_blocks.0.ff.net.2": scale * up @ down}))
    attach(model, parse_lora(sd, model))
    torch.testing.assert_close(run(model), expected, atol=1e-5, rtol=1e-5)


def test_strength_zero_and_detach_restore_the_base_exactly_and_strength_scales():
    model = small_dit(layers=1)
    base = run(model)
    up, down = lowrank(3 * DIM, DIM)
    lora = parse_lora({"transformer_blocks.0.attn1.wqkv.lora_B.weight": up,
                       "transformer_blocks.0.attn1.wqkv.lora_A.weight": down}, model)
    handle = attach(model, lora, strength=0.0)
    assert torch.equal(run(model), base)
    handle.set_strength(0.5)
    half = run(model)
    expected = run(merged_copy(model, {"transformer_blocks.0.attn1.wqkv": 0.5 * up @ down}))
    torch.testing.assert_close(half, expected, atol=1e-5, rtol=1e-5)
    handle.detach()
    assert torch.equal(run(model), base)


def test_lora_for_another_model_is_an_error_naming_its_keys():
    model = small_dit(layers=1)
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 2),
          "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 4)}
    with pytest.raises(LoraError, match="matches no Step-Video DiT layer.*down_blocks_0"):
        parse_lora(sd, model)


def test_partially_matching_lora_reports_what_matched(tmp_path):
    model = small_dit(layers=1)
    up, down = lowrank(DIM, DIM)
    sd = {"transformer_blocks.0.attn1.wo.lora_B.weight": up, "transformer_blocks.0.attn1.wo.lora_A.weight": down,
          "transformer_blocks.9.attn1.wo.lora_B.weight": up, "transformer_blocks.9.attn1.wo.lora_A.weight": down}
    lora = parse_lora(sd, model)
    assert lora.matched_modules == 1 and lora.unmatched == ["transformer_blocks.9.attn1.wo"]
    assert lora.summary() == ("Step-Video LoRA: 1 DiT layer(s) patched from 4 tensor(s); 1 tensor(s) matched no layer "
                              "(e.g. transformer_blocks.9.attn1.wo)")
    assert lora.summary(accepted=0).startswith("Step-Video LoRA: 0 of 1 DiT layer(s) patched")


def test_save_and_load_round_trip(tmp_path):
    model = small_dit(layers=2)
    base = run(model)
    lora = new_trainable_lora(model, rank=2, seed=1)
    assert len(lora.pairs) == 2 * 7
    handle = attach(model, lora)
    assert torch.equal(run(model), base), "fresh adapters start at the base model"
    with torch.no_grad():
        for pair in lora.pairs.values():
            pair.up.normal_(0, 0.1)
    trained = run(model)
    handle.detach()
    path = tmp_path / "dpo.safetensors"
    save_lora(lora, path)
    reloaded = load_lora(path, model)
    assert reloaded.matched_modules == 14 and not reloaded.unmatched
    attach(model, reloaded)
    torch.testing.assert_close(run(model), trained, atol=1e-6, rtol=1e-6)


def test_training_alpha_scales_the_delta_and_is_folded_in_on_save(tmp_path):
    model = small_dit(layers=1)
    base = run(model)
    deltas = {}
    outputs = []
    for alpha in (2.0, 4.0):  # rank 2: scale 1 then 2, same factors
        lora = new_trainable_lora(model, rank=2, alpha=alpha, seed=1)
        with torch.no_grad():
            for name, pair in lora.pairs.items():
                pair.up.copy_(torch.randn(pair.up.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
                deltas[name] = pair.up @ pair.down
        handle = attach(model, lora)
        outputs.append(run(model))
        handle.detach()
    expected = run(merged_copy(model, {k: 2 * v for k, v in deltas.items()}))
    torch.testing.assert_close(outputs[1], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[0], base)
    save_lora(lora, tmp_path / "a.safetensors")
    attach(model, load_lora(tmp_path / "a.safetensors", model))
    torch.testing.assert_close(run(model), outputs[1], atol=1e-6, rtol=1e-6)
