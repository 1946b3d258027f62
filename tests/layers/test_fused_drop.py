""" The fused DropCluster mask op against the torch expression it replaces.

CPU: the custom op (reference implementation), autograd, torch.compile, TorchScript, input checks.
The Triton kernel runs on the CPU through Triton's interpreter (in a subprocess: TRITON_INTERPRET must
be set before triton is imported) and is compiled, without a GPU, for two NVIDIA architectures. The
CUDA tests run where a GPU is present.
"""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dropcluster_timm.layers import fused_drop
from dropcluster_timm.layers.fused_drop import apply_cluster_keep, apply_cluster_keep_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(3, 4, 7), (3, 4, 5, 6), (2, 3, 3, 4, 5)]  # 1d, 2d, 3d spatial
# (G = C, M = G): G = 1 forces M = 1
GROUPS = [(False, False), (True, False), (True, True)]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _floor(x, idx, keep):
    """The end of ``drop_cluster``, written out: ``x * keep.to(x.dtype).gather(...)``."""
    draws, G, n = keep.shape[0], keep.shape[1], idx.shape[1]
    mask = keep.to(x.dtype).gather(2, idx.long().unsqueeze(0).expand(draws, G, n)).view([draws, G] + list(x.shape[2:]))
    return x * mask


def _channels_last(x):
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x.transpose(1, 2).contiguous().transpose(1, 2)  # (B, L, C) in memory


def _case(shape, per_sample=True, per_channel=True, per_map=True, dtype=torch.float32, channels_last=False,
          k=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B, C, n = shape[0], shape[1], math.prod(shape[2:])
    G = C if per_channel else 1
    M = G if per_map else 1
    x = torch.randn(shape, generator=gen).to(dtype)
    if channels_last:
        x = _channels_last(x)
    idx = torch.randint(0, k, (M, n), generator=gen)
    # Zeros and full-mantissa float32 scales, as drop_cluster builds them: products need rounding.
    keep = (torch.rand((B if per_sample else 1, G, k), generator=gen) > 0.3).float() * (
        1.0 + 2.0 * torch.rand((B if per_sample else 1, G, k), generator=gen))
    return x, idx, keep


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('per_channel,per_map', GROUPS)
@pytest.mark.parametrize('per_sample', [False, True])
@pytest.mark.parametrize('shape', SHAPES, ids=['1d', '2d', '3d'])
def test_matches_floor_bitwise(shape, per_sample, per_channel, per_map, dtype, channels_last):
    x, idx, keep = _case(shape, per_sample, per_channel, per_map, dtype, channels_last)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    y = apply_cluster_keep(x1, idx, keep)
    y_ref = _floor(x2, idx, keep)
    assert y.dtype == dtype and y.stride() == x.stride()
    assert torch.equal(y, y_ref)
    assert torch.equal(apply_cluster_keep_reference(x, idx, keep), y_ref)
    grad = torch.randn(shape).to(dtype)
    y.backward(grad)
    y_ref.backward(grad)
    assert torch.equal(x1.grad, x2.grad)


def test_idx_as_label_map():
    x, idx, keep = _case((2, 3, 4, 5))
    assert torch.equal(apply_cluster_keep(x, idx.view(3, 4, 5).int(), keep), _floor(x, idx, keep))


def test_drops_whole_clusters():
    x = torch.ones(1, 2, 2, 3)
    idx = torch.tensor([[0, 0, 1, 1, 2, 2], [2, 1, 0, 2, 1, 0]])
    keep = torch.tensor([[[0.0, 2.0, 4.0], [1.0, 0.0, 3.0]]])
    y = apply_cluster_keep(x, idx, keep)
    assert y.flatten().tolist() == [0, 0, 2, 2, 4, 4, 3, 0, 1, 3, 0, 1]


def test_backward_saves_only_the_table():
    x, idx, keep = _case((4, 8, 6, 6))
    x.requires_grad_()

    def saved_numels(fn):
        numels = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: numels.append(t.numel()) or t, lambda t: t):
            fn(x, idx, keep).sum().backward()
        return sorted(numels)

    assert saved_numels(apply_cluster_keep) == sorted([idx.numel(), keep.numel()])
    assert x.numel() in saved_numels(_floor)  # the floor keeps the full-size mask


def test_gradcheck_float64():
    x, idx, keep = _case((2, 3, 2, 3), k=3)
    x = x.double().requires_grad_()
    keep = keep.double()
    assert torch.autograd.gradcheck(lambda t: apply_cluster_keep(t, idx, keep), (x,))
    assert torch.autograd.gradgradcheck(lambda t: apply_cluster_keep(t, idx, keep), (x,))


def test_opcheck():
    x, idx, keep = _case((2, 3, 4, 5))
    torch.library.opcheck(torch.ops.dropcluster.apply_cluster_keep, (x.requires_grad_(), idx, keep))
    x, idx, keep = _case((2, 3, 4, 5), per_map=False, dtype=torch.bfloat16, channels_last=True)
    torch.library.opcheck(torch.ops.dropcluster.apply_cluster_keep, (x, idx, keep))


@pytest.mark.parametrize('dtype,channels_last', [(torch.float32, False), (torch.bfloat16, True)])
def test_compile_fullgraph(dtype, channels_last):
    x, idx, keep = _case((2, 3, 4, 5), dtype=dtype, channels_last=channels_last)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend('aot_eager')(gm, example_inputs)

    def fn(x, idx, keep):
        return apply_cluster_keep(x, idx, keep) * 2

    torch._dynamo.reset()
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    y = torch.compile(fn, backend=backend, fullgraph=True)(x1, idx, keep)
    y_ref = _floor(x2, idx, keep) * 2
    assert torch.equal(y, y_ref) and y.stride() == y_ref.stride()
    y.sum().backward()
    y_ref.sum().backward()
    assert torch.equal(x1.grad, x2.grad)
    assert len(graphs) == 1
    assert 'dropcluster.apply_cluster_keep' in graphs[0].code


def test_torchscript_falls_back_to_reference():
    class Mod(torch.nn.Module):
        def forward(self, x, idx, keep):
            return apply_cluster_keep(x, idx, keep)

    scripted = torch.jit.script(Mod())
    graph = str(scripted.inlined_graph)
    assert 'dropcluster::' not in graph and 'aten::gather' in graph
    x, idx, keep = _case((2, 3, 4, 5))
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    y = scripted(x1, idx, keep)
    y_ref = _floor(x2, idx, keep)
    assert torch.equal(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    assert torch.equal(x1.grad, x2.grad)
    with pytest.raises(torch.jit.Error, match='labels per map'):
        scripted(x, idx[:, :-1], keep)


def _bad_inputs():
    x, idx, keep = _case((2, 3, 4, 5))
    return [
        ((x[0, 0], idx, keep), r'x of shape \(B, C, \*spatial\)'),
        ((x.long(), idx, keep), 'floating point x'),
        ((x, idx.float(), keep), 'idx must be integer'),
        ((x, idx > 0, keep), 'idx must be integer'),
        ((x, idx[0], keep), 'idx must be integer'),
        ((x, idx, keep[0]), 'keep must be a floating point table'),
        ((x, idx, keep.long()), 'keep must be a floating point table'),
        ((x, idx, keep.repeat(2, 1, 1)), 'keep has 4 draws, expected 1 or the batch size 2'),
        ((x, idx, keep[:, :2]), 'keep has 2 channel groups, expected 1 or the channel count 3'),
        ((x, idx, keep[:, :1]), r'idx has 3 maps, expected 1 or the channel groups of keep \(1\)'),
        ((x, idx[:, :-1], keep), 'idx has 19 labels per map, expected the 20 spatial elements of x'),
        ((x, idx, keep[:, :, :0]), 'at least one cluster'),
        ((x, idx.to('meta'), keep), 'one device'),
    ]


@pytest.mark.parametrize('case', range(len(_bad_inputs())))
def test_bad_inputs_raise(case):
    args, message = _bad_inputs()[case]
    with pytest.raises(ValueError, match=message):
        apply_cluster_keep(*args)
    with pytest.raises(ValueError, match=message):
        apply_cluster_keep_reference(*args)


def test_op_checks_its_inputs():
    x, idx, keep = _case((2, 3, 4, 5))
    with pytest.raises(ValueError, match='labels per map'):
        torch.ops.dropcluster.apply_cluster_keep(x, idx[:, :-1], keep)


def _run_python(code, **env):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]), **env)
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=120)


def test_imports_and_falls_back_without_triton():
    proc = _run_python('''
        import sys
        sys.modules['triton'] = None  # import triton raises ImportError
        import torch
        from dropcluster_timm.layers import fused_drop as fd
        assert fd.triton is None
        x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
        idx = torch.randint(0, 4, (3, 20))
        keep = torch.rand(2, 3, 4)
        out = fd._apply_cuda(x, idx, keep)  # the CUDA implementation, run on CPU tensors
        assert torch.equal(out, x * keep.gather(2, idx.unsqueeze(0).expand(2, 3, 20)).view(2, 3, 4, 5))
        assert out.stride() == x.stride()
        print('OK')
    ''')
    assert proc.returncode == 0 and 'OK' in proc.stdout, proc.stderr


INTERPRETER_SCRIPT = '''
    import math
    try:
        import triton
        import triton.language
    except Exception as e:
        print('SKIP: triton cannot be imported: ' + repr(e))
        raise SystemExit(0)
    import torch
    from dropcluster_timm.layers import fused_drop as fd
    assert fd.triton is not None

    def channels_last(x):
        if x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        if x.dim() == 5:
            return x.contiguous(memory_format=torch.channels_last_3d)
        return x.transpose(1, 2).contiguous().transpose(1, 2)

    def case(shape, dtype, cl, per_sample, per_channel, per_map, idx_dtype, seed):
        gen = torch.Generator().manual_seed(seed)
        B, C, n, k = shape[0], shape[1], math.prod(shape[2:]), 4
        G = C if per_channel else 1
        M = G if per_map else 1
        if dtype == torch.bfloat16:
            # The interpreter truncates float32 to bfloat16 where the compiled kernel rounds to
            # nearest even; values of few significant bits make every product exact, so the test
            # still checks the indexing bit for bit.
            x = torch.randint(-16, 17, shape, generator=gen).to(dtype) / 8
            keep = torch.randint(0, 9, (B if per_sample else 1, G, k), generator=gen).float() / 4
        else:
            x = torch.randn(shape, generator=gen).to(dtype)
            keep = (torch.rand((B if per_sample else 1, G, k), generator=gen) > 0.3).float() * (
                1.0 + 2.0 * torch.rand((B if per_sample else 1, G, k), generator=gen))
        if cl:
            x = channels_last(x)
        idx = torch.randint(0, k, (M, n), generator=gen).to(idx_dtype)
        return x, idx, keep

    count = 0
    for shape in [(2, 3, 5), (2, 3, 4, 5), (2, 3, 2, 3, 4)]:
        for dtype in [torch.float32, torch.float16, torch.bfloat16]:
            for cl in [False, True]:
                for groups in [(True, True, True), (False, True, False), (True, False, False)]:
                    for idx_dtype in [torch.int64, torch.int32]:
                        x, idx, keep = case(shape, dtype, cl, *groups, idx_dtype, count)
                        ref = fd.apply_cluster_keep_reference(x, idx, keep)
                        out = torch.empty_like(x)
                        fd._launch(x, idx, keep, out, cl)
                        assert torch.equal(out, ref), (shape, dtype, cl, groups, idx_dtype)
                        count += 1

    # The dispatch of the CUDA implementation: a slice and an expanded gradient go through one copy,
    # a layout the kernel does not decode and float64 through the floor; all land in empty_like(x).
    x, idx, keep = case((2, 3, 4, 6), torch.float32, False, True, True, True, torch.int64, 0)
    for t in [x[..., ::2], channels_last(x)[..., ::2], torch.ones(1, 1, 1, 1).expand(2, 3, 4, 6),
              x.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3), x.double(), x[:, :, :0]]:
        i = idx.view(3, 4, 6)[:, :t.shape[2], :t.shape[3]].reshape(3, t.shape[2] * t.shape[3])
        out = fd._apply_cuda(t, i, keep)
        assert torch.equal(out, fd.apply_cluster_keep_reference(t, i, keep))
        assert out.stride() == torch.empty_like(t).stride()
        count += 1
    print('OK', count)
'''


def test_triton_kernel_in_interpreter():
    proc = _run_python(INTERPRETER_SCRIPT, TRITON_INTERPRET='1')
    if proc.stdout.startswith('SKIP:'):
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0 and 'OK 114' in proc.stdout, proc.stdout + proc.stderr


def _nvidia_backend():
    if fused_drop.triton is None:
        return False
    from triton.backends import backends
    return 'nvidia' in backends


@pytest.mark.skipif(not _nvidia_backend(), reason='needs triton with its NVIDIA backend (no GPU needed)')
@pytest.mark.parametrize('arch', [80, 90])
def test_triton_kernel_compiles(arch):
    """The interpreter runs the kernel as Python; this runs the real compiler down to a cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for dtype, idx_type, channels_last, wide in [('bf16', 'i32', True, False), ('fp16', 'i64', False, True),
                                                 ('fp32', 'i64', True, False)]:
        signature = dict(x_ptr='*' + dtype, idx_ptr='*' + idx_type, keep_ptr='*' + dtype, out_ptr='*' + dtype,
                         N='i64' if wide else 'i32', C='i32', n='i32', idx_stride_c='i32', keep_stride_b='i32',
                         keep_stride_c='i32', CHANNELS_LAST='constexpr', WIDE='constexpr', BLOCK='constexpr')
        constexprs = dict(CHANNELS_LAST=channels_last, WIDE=wide, BLOCK=fused_drop._BLOCK)
        compiled = triton.compile(ASTSource(fused_drop._cluster_keep_kernel, signature, constexprs),
                                  target=GPUTarget('cuda', arch, 32))
        assert len(compiled.asm['cubin']) > 0


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@cuda
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('per_channel,per_map', GROUPS)
@pytest.mark.parametrize('per_sample', [False, True])
@pytest.mark.parametrize('shape', [(3, 4, 7), (8, 32, 14, 14), (2, 8, 4, 6, 5)], ids=['1d', '2d', '3d'])
def test_cuda_matches_floor_bitwise(shape, per_sample, per_channel, per_map, dtype, channels_last, monkeypatch):
    launches = []
    launch = fused_drop._launch
    monkeypatch.setattr(fused_drop, '_launch', lambda *args: launches.append(1) or launch(*args))
    x, idx, keep = _case(shape, per_sample, per_channel, per_map, dtype, channels_last)
    x, idx, keep = x.cuda(), idx.cuda(), keep.cuda()
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    y = apply_cluster_keep(x1, idx, keep)
    y_ref = _floor(x2, idx, keep)
    assert y.stride() == x.stride()
    assert torch.equal(y, y_ref)
    grad = torch.randn(shape, device='cuda').to(dtype)
    y.backward(grad)
    y_ref.backward(grad)
    assert torch.equal(x1.grad, x2.grad)
    assert len(launches) == (2 if fused_drop.triton is not None else 0)


@cuda
def test_cuda_odd_layouts_and_fallback(monkeypatch):
    x, idx, keep = _case((2, 3, 4, 6), k=7)
    x, idx, keep = x.cuda(), idx.cuda().int(), keep.cuda()
    inputs = [x[..., ::2], torch.ones(1, 1, 1, 1, device='cuda').expand(2, 3, 4, 6),
              x.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3), x.double(), x[:, :, :0]]
    for use_triton in [True, False]:
        if not use_triton:
            monkeypatch.setattr(fused_drop, 'triton', None)
        for t in inputs:
            i = idx.view(3, 4, 6)[:, :t.shape[2], :t.shape[3]].reshape(3, t.shape[2] * t.shape[3])
            out = apply_cluster_keep(t, i, keep)
            assert torch.equal(out, _floor(t, i, keep))
            assert out.stride() == torch.empty_like(t).stride()


@cuda
def test_cuda_compile_inductor():
    x, idx, keep = _case((4, 16, 8, 8), dtype=torch.bfloat16, channels_last=True)
    x, idx, keep = x.cuda(), idx.cuda(), keep.cuda()
    torch._dynamo.reset()
    fn = torch.compile(lambda x, idx, keep: apply_cluster_keep(x, idx, keep).float().sum(), fullgraph=True)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    fn(x1, idx, keep).backward()
    _floor(x2, idx, keep).float().sum().backward()
    assert torch.equal(x1.grad, x2.grad)


# --- drop_cluster's dispatch: CUDA inputs take the fused op, everything else the torch path


def test_drop_cluster_on_the_cpu_keeps_the_torch_path():
    """The CPU path saves the full-size mask for the backward (the fused op saves only the table):
    seen through the saved-tensor hooks, so the dispatch is observed, not assumed."""
    from dropcluster_timm import drop_cluster
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    cluster_map = torch.randint(0, 4, (3, 8, 8), dtype=torch.int32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        drop_cluster(x, cluster_map, drop_prob=0.5, num_clusters=4)
    assert (2, 3, 8, 8) in [tuple(s) for s in saved]


@cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_drop_cluster_on_cuda_is_fused_and_matches_the_torch_path(dtype):
    from dropcluster_timm import drop_cluster
    x = torch.randn(4, 8, 14, 14, device='cuda', dtype=dtype, requires_grad=True)
    cluster_map = torch.randint(0, 5, (8, 14, 14), dtype=torch.int32, device='cuda')
    saved = []
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        fused = drop_cluster(x, cluster_map, drop_prob=0.3, num_clusters=5)
    assert max(saved) < x.numel()  # no full-size mask kept for the backward
    torch.manual_seed(0)
    reference = drop_cluster(x.detach().clone(), cluster_map, drop_prob=0.3, num_clusters=5, inplace=True)
    assert torch.equal(fused, reference)  # same draws, same table, bit-identical product
