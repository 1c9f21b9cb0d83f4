"""Host hooks in the core DiT: ``transformer_options`` reaches every block and attention call, and per-block
replacement at ``patches_replace["dit"][("double_block", i)]`` runs instead of block ``i``."""

import torch

from stepvideo_core.attention import sdpa_attention
from tests.builders import small_dit, text_inputs


def inputs(b=2):
    x = torch.randn(b, 2, 4, 2, 3, generator=torch.Generator().manual_seed(3))
    llm, mask, clip = text_inputs(b, 6, (24, 12), (2, 6)[:b])
    return x, torch.tensor([0.1, 0.7])[:b], llm, mask, clip


def test_options_reach_every_attention_call_and_change_nothing_by_themselves():
    model = small_dit(layers=3)
    seen = []

    def spy(q, k, v, mask=None, transformer_options=None):
        seen.append(transformer_options.get("tag"))
        return sdpa_attention(q, k, v, mask)

    with torch.no_grad():
        plain = model(*inputs())
        model.set_attention(spy)
        tagged = model(*inputs(), transformer_options={"tag": "run-7"})
    assert seen == ["run-7"] * 6  # 3 blocks x (self, cross)
    assert torch.equal(plain, tagged)


def test_block_patch_sees_each_block_and_can_call_or_skip_it():
    model = small_dit(layers=3)
    calls = []

    def passthrough(args, extra):
        calls.append(args["block_index"])
        assert args["transformer_options"]["patches_replace"]["dit"]
        return extra["original_block"](args)

    def skip(args, extra):
        return {"img": args["img"]}

    with torch.no_grad():
        ref = model(*inputs())
        every = {("double_block", i): passthrough for i in range(3)}
        got = model(*inputs(), transformer_options={"patches_replace": {"dit": every}})
        skipped = model(*inputs(), transformer_options={"patches_replace": {"dit": {("double_block", 1): skip}}})
        # the same model without block 1, run by hand through the forward's stages
        x, context, embedded, grid = model.prepare(*inputs())
        for i in (0, 2):
            x = model.transformer_blocks[i](x, context.modulation, context.text, context.text_mask, context.rope,
                                            context.attention)
        expected = model.unpatchify(model.finish(x, embedded), grid)
    assert calls == [0, 1, 2]
    assert torch.equal(got, ref)
    assert torch.equal(skipped, expected) and not torch.equal(skipped, ref)
