import pytest
import torch
from ldm.modules.attention import CrossAttention

from accdiffusion.method.attention import AttentionRecorder, downsampled_size, find_cross_attention
from accdiffusion.lab.reference import first_pass


def unet_call(host, x, t, conds):
    return host._eps(x, t, conds)


@pytest.mark.parametrize("host_name,size", [("sd1_host", (16, 24)), ("sdxl_host", (24, 16))])
def test_recorder_leaves_outputs_bit_identical_and_maps_sum_to_one(request, host_name, size):
    host = request.getfixturevalue(host_name)
    conds = host.encode(["a cat on a mat", "a dog"]) + host.encode(["", ""])
    x = torch.randn(4, 4, *size)
    t = torch.tensor([500.0] * 4)
    with torch.no_grad():
        plain = unet_call(host, x, t, conds)
        recorder = AttentionRecorder(size, num_images=2)
        modules = find_cross_attention(host.unet)
        before = [dict(m.__dict__) for m in modules]
        with recorder.attach(modules):
            recorder.row_images = [0, 1, None, None]
            recorded = unet_call(host, x, t, conds)
        assert all(dict(m.__dict__) == b for m, b in zip(modules, before))
        again = unet_call(host, x, t, conds)
    assert torch.equal(plain, recorded) and torch.equal(plain, again)
    for image in (0, 1):
        maps = recorder.maps(image)
        assert maps.shape == (77, *recorder.grid)
        assert torch.allclose(maps.sum(0), torch.ones(recorder.grid), atol=1e-5)
    assert recorder.grid == (downsampled_size(size[0], 4), downsampled_size(size[1], 4))
    assert recorder.nbytes() == 2 * 77 * recorder.grid[0] * recorder.grid[1] * 4
    assert int(recorder.counts[0]) > 0 and int(recorder.counts[0]) == int(recorder.counts[1])


def test_memory_does_not_grow_with_steps(sd1_host):
    _, short = first_pass(sd1_host, ["a cat"], "", (16, 16), 2, seed=1)
    _, long = first_pass(sd1_host, ["a cat"], "", (16, 16), 6, seed=1)
    assert short.nbytes() == long.nbytes() == 77 * 4 * 4 * 4
    assert int(long.counts[0]) == 3 * int(short.counts[0])


def test_only_positive_rows_are_recorded(sd1_host):
    cond, neg = sd1_host.encode(["a cat"]), sd1_host.encode(["a dog"])
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([400.0, 400.0])
    modules = find_cross_attention(sd1_host.unet)
    with torch.no_grad():
        a = AttentionRecorder((16, 16), 1)
        with a.attach(modules):
            a.row_images = [0, None]
            unet_call(sd1_host, x, t, cond + neg)
        b = AttentionRecorder((16, 16), 1)
        with b.attach(modules):
            b.row_images = [None, 0]  # the same image's positive row, now second
            unet_call(sd1_host, x.flip(0), t, neg + cond)
    assert torch.allclose(a.maps(0), b.maps(0), atol=1e-6)


def test_recorder_survives_a_class_level_forward_swap_and_restores_instance_forwards(sd1_host):
    modules = find_cross_attention(sd1_host.unet)
    original = CrossAttention.forward
    calls = []

    def swapped(self, x, context=None, mask=None, **kwargs):  # what the WebUI's optimisations do
        calls.append(1)
        return original(self, x, context, mask)

    sentinel = modules[0].forward  # an instance-level forward someone else installed
    modules[0].forward = sentinel
    try:
        CrossAttention.forward = swapped
        recorder = AttentionRecorder((16, 16), 1)
        with torch.no_grad(), recorder.attach(modules):
            recorder.row_images = [0]
            unet_call(sd1_host, torch.randn(1, 4, 16, 16), torch.tensor([300.0]), sd1_host.encode(["a cat"]))
        assert calls and recorder.maps(0) is not None
    finally:
        CrossAttention.forward = original
    assert modules[0].__dict__["forward"] is sentinel
    del modules[0].forward
    assert all("forward" not in m.__dict__ for m in modules)


def test_detach_on_error_leaves_modules_clean(sd1_host):
    modules = find_cross_attention(sd1_host.unet)
    recorder = AttentionRecorder((16, 16), 1)
    with pytest.raises(RuntimeError):
        with recorder.attach(modules):
            raise RuntimeError("interrupted")
    assert not recorder.attached
    assert all("forward" not in m.__dict__ for m in modules)


def test_detach_restores_the_modules_even_when_the_pending_layers_fail(sd1_host):
    """The pending layers are computed at detach; if that fails (out of memory), the UNet must
    still be left as it was."""
    modules = find_cross_attention(sd1_host.unet)
    recorder = AttentionRecorder((16, 16), 1)
    recorder.attach(modules)
    recorder.row_images = [0]
    with torch.no_grad():
        unet_call(sd1_host, torch.randn(1, 4, 16, 16), torch.tensor([300.0]), sd1_host.encode(["a cat"]))

    def out_of_memory():
        raise RuntimeError("CUDA out of memory")

    recorder.flush = out_of_memory
    with pytest.raises(RuntimeError, match="out of memory"):
        recorder.detach()
    assert not recorder.attached
    assert all("forward" not in m.__dict__ for m in modules)


def test_map_orientation_on_a_non_square_grid():
    """Query position p = r·gw + c (the transformer's row-major flatten) must land at map[r, c]."""
    torch.manual_seed(0)
    attn = CrossAttention(query_dim=8, context_dim=8, heads=2, dim_head=4)
    with torch.no_grad():
        attn.to_q.weight.copy_(torch.eye(8))
        attn.to_k.weight.copy_(torch.eye(8))
    gh, gw = 2, 3
    x = torch.zeros(1, gh * gw, 8)
    x[0, 1 * gw + 2, :] = 10.0  # row 1, col 2 looks at token 1
    context = torch.zeros(1, 3, 8)
    context[0, 1, :] = 1.0
    recorder = AttentionRecorder((8, 12), 1)  # grid (2, 3) at downsample 4
    assert recorder.grid == (gh, gw)
    with recorder.attach([attn]):
        recorder.row_images = [0]
        attn(x, context=context)
    maps = recorder.maps(0)
    assert maps.shape == (3, gh, gw)
    assert maps[1].argmax() == 1 * gw + 2 and float(maps[1, 1, 2]) > 0.99


def record_maps(host, x, t, conds, row_images):
    recorder = AttentionRecorder(tuple(x.shape[-2:]), 1)
    with torch.no_grad(), recorder.attach(find_cross_attention(host.unet)):
        recorder.row_images = row_images
        out = unet_call(host, x, t, conds)
    return recorder, out


def test_recording_reuses_the_projections_the_attention_computed(sd1_host, monkeypatch):
    """The recorded layers' q and k come from the attention's own to_q/to_k calls (a class-level
    Linear.forward patch, as A1111's LoRA installs, still runs): recording adds no projection."""
    conds = sd1_host.encode(["a cat on a mat"]) + sd1_host.encode([""])
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([500.0, 500.0])
    calls: dict[int, int] = {}
    linear_forward = torch.nn.Linear.forward

    def counting(self, inp):
        calls[id(self)] = calls.get(id(self), 0) + 1
        return linear_forward(self, inp)

    monkeypatch.setattr(torch.nn.Linear, "forward", counting)
    with torch.no_grad():
        plain = unet_call(sd1_host, x, t, conds)
    plain_calls = dict(calls)
    calls.clear()
    recorder, recorded = record_maps(sd1_host, x, t, conds, [0, None])
    assert int(recorder.counts[0]) > 0 and torch.equal(plain, recorded)
    assert calls == plain_calls
    assert all("forward" not in m.to_q.__dict__ and "forward" not in m.to_k.__dict__
               for m in find_cross_attention(sd1_host.unet))


def test_attention_without_to_q_calls_is_recorded_by_its_own_projection(sd1_host, monkeypatch):
    """An attention that projects by itself (fused weights, another extension) leaves nothing to
    reuse: the recorder projects the positive rows itself, and the maps are the same."""
    conds = sd1_host.encode(["a cat on a mat"]) + sd1_host.encode([""])
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([500.0, 500.0])
    reused, out = record_maps(sd1_host, x, t, conds, [0, None])

    def fused(self, x, context=None, mask=None, **kwargs):
        # the same attention, projecting from the weights instead of calling to_q/to_k/to_v
        context = x if context is None else context
        b, heads = x.shape[0], self.heads
        q, k, v = (torch.nn.functional.linear(inp, lin.weight, lin.bias).reshape(b, inp.shape[1], heads, -1)
                   .transpose(1, 2) for inp, lin in ((x, self.to_q), (context, self.to_k), (context, self.to_v)))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, x.shape[1], -1))

    monkeypatch.setattr(CrossAttention, "forward", fused)
    projected, out_fused = record_maps(sd1_host, x, t, conds, [0, None])
    assert torch.allclose(out, out_fused, atol=1e-4)
    assert int(projected.counts[0]) == int(reused.counts[0]) > 0
    assert torch.allclose(projected.maps(0), reused.maps(0), atol=1e-6)


def test_layers_computed_together_give_the_layer_by_layer_maps(sd1_host, monkeypatch):
    """The batched computation of pending layers (several UNet calls' worth) adds up to exactly
    what one layer at a time gives."""
    from accdiffusion.method import attention

    def run():
        _, recorder = first_pass(sd1_host, ["a cat on a mat", "a dog"], "", (16, 16), 3, seed=2)
        return recorder

    together = run()
    monkeypatch.setattr(attention, "PENDING_LAYERS", 1)
    one_by_one = run()
    assert torch.equal(together.counts, one_by_one.counts) and int(together.counts[0]) == 3 * 3  # 3 steps × 3 layers
    for image in (0, 1):
        assert torch.allclose(together.maps(image), one_by_one.maps(image), atol=1e-6)


@pytest.mark.parametrize("host_name", ["sd1_host", "sdxl_host"])
def test_recording_adds_a_few_operations_per_layer_not_a_product_each(request, host_name):
    """On a GPU the recorder's cost is its kernel launches: per recorded layer it may only take
    views of q and k; the products, softmax and sums run once for the pending layers together."""
    from accdiffusion.lab.bench import recording_cost

    host = request.getfixturevalue(host_name)
    size = (16, 16)
    cost = recording_cost(host, size)
    _, recorder = first_pass(host, ["a cat"], "", size, 1, seed=0)
    layers = int(recorder.counts[0])  # recorded layer calls in one UNet call
    assert layers >= 3
    added = cost["recording_ops"] - cost["plain_ops"]
    assert 0 < added <= 4 * layers + 30, (added, layers)
