"""``legofx.export`` of models whose inputs and outputs are not a flat tuple of tensors: lists,
dicts, dataclasses, ``ModelOutput``, keyword arguments; errors that name the remedy; nothing
left at ``path`` when an export fails."""

from dataclasses import dataclass

import onnx
import pytest
import torch
from torch import nn

import legofx
from legofx.deploy import MismatchError, output_error
from deploy_helpers import folded_net


@dataclass
class Detections:
    boxes: torch.Tensor
    scores: list


class Structured(nn.Module):
    """A list of images and a keyword tensor in; a dict holding a dataclass out."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))

    def forward(self, images, *, scale):
        features = [self.body(image) * scale for image in images]
        return {"features": features,
                "detections": Detections(features[0].mean((2, 3)), [features[1].amax((2, 3))])}


def _folded_structured():
    return folded_net(Structured().eval())


def _inputs(batch=1):
    torch.manual_seed(0)
    return ([torch.randn(batch, 4, 8, 8), torch.randn(batch, 4, 6, 6)],), {"scale": torch.full((1,), 2.0)}


@pytest.mark.parametrize("suffix", ["onnx", "pt2"])
def test_nested_inputs_keywords_and_structured_outputs_export(tmp_path, suffix):
    folded = _folded_structured()
    args, kwargs = _inputs()
    result = legofx.export(folded, args, tmp_path / f"m.{suffix}", example_kwargs=kwargs)
    assert result.max_error <= result.tolerance
    if suffix == "pt2":  # the reloaded program returns the same structure
        out = torch.export.load(str(result.path)).module()(*args, **kwargs)
        assert isinstance(out["detections"], Detections)
        assert output_error(out, folded(*args, **kwargs))[0] <= result.tolerance
        return
    graph = onnx.load(str(result.path)).graph
    assert [o.name for o in graph.output] == ["features.0", "features.1", "detections.boxes",
                                              "detections.scores.0"]
    assert [i.name for i in graph.input] == ["images_0", "images_1", "scale"]


def test_model_output_and_a_dynamic_batch(tmp_path):
    from transformers.modeling_outputs import BaseModelOutput

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, pixel_values):
            first = self.a(pixel_values)
            last = self.b(torch.relu(first))
            return BaseModelOutput(last_hidden_state=last, hidden_states=(first, last))

    folded = folded_net(Encoder().eval())
    result = legofx.export(folded, torch.randn(1, 4, 8, 8), tmp_path / "m.onnx")
    assert result.dynamic and result.batches == (1, 2) and result.ops.ok
    names = [o.name for o in onnx.load(str(result.path)).graph.output]
    assert names == ["last_hidden_state", "hidden_states.0", "hidden_states.1"]


def test_output_error_compares_leaf_by_leaf_and_names_the_leaf():
    expected = {"a": torch.ones(2), "b": [torch.zeros(3), torch.ones(1, 2)]}
    flat = [torch.ones(2), torch.zeros(3), torch.ones(1, 2) * 1.5]  # as ONNX Runtime returns them
    assert output_error(flat, expected) == (0.5, 0.5)  # exact in float64: |1.5 - 1| / 1
    with pytest.raises(MismatchError, match=r"out\.b\[1\]: torch.float32 \(2,\)"):
        output_error([torch.ones(2), torch.zeros(3), torch.ones(2)], expected)
    with pytest.raises(MismatchError, match=r"2 output tensors, expected 3 \(out\.a, out\.b\[0\]"):
        output_error(flat[:2], expected)


def test_a_leaf_that_cannot_be_exported_is_named_by_its_path(tmp_path):
    class Odd(nn.Module):
        def forward(self, x):
            return {"hidden_states": [x, x + 1, object()]}

    with pytest.raises(TypeError, match=r"out\.hidden_states\[2\] is a object"):
        legofx.export(Odd().eval(), torch.randn(2, 3), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


class FixedBatch(nn.Module):
    """Only batch 2 works (``view(2, -1)``): a dynamic batch cannot be exported."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).view(2, -1)


def test_a_batch_that_cannot_be_dynamic_names_the_remedy(tmp_path):
    folded = folded_net(FixedBatch().eval())
    x = torch.randn(2, 4, 6, 6)
    with pytest.raises(ValueError, match="dynamic_batch=False"):
        legofx.export(folded, x, tmp_path / "m.onnx", dynamic_batch=True)
    assert not list(tmp_path.iterdir())
    with pytest.warns(UserWarning, match="exported with the example batch fixed"):
        result = legofx.export(folded, x, tmp_path / "m.onnx")  # default: fixed, with a warning
    assert not result.dynamic and result.batches == (2,)


class Drifting(nn.Module):
    """Each call multiplies by one more: the file (a constant) cannot match the eager model."""

    def __init__(self):
        super().__init__()
        self.conv, self.calls = nn.Conv2d(4, 4, 1), 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x) * self.calls


@pytest.mark.parametrize("suffix", ["onnx", "pt2"])
def test_a_failed_export_leaves_nothing_and_keeps_the_old_file(tmp_path, suffix):
    path = tmp_path / f"m.{suffix}"
    path.write_bytes(b"the previous export")
    with pytest.raises(MismatchError):
        legofx.export(Drifting().eval(), torch.randn(2, 4, 4, 4), path)
    assert path.read_bytes() == b"the previous export"
    assert [f.name for f in tmp_path.iterdir()] == [path.name]  # no temporary left either


class Pair:
    """A pytree node registered without key paths, as diffusers registers ``BaseOutput``."""

    def __init__(self, sample, extra):
        self.sample, self.extra = sample, extra


torch.utils._pytree.register_pytree_node(
    Pair, lambda p: ([p.sample, p.extra], ["sample", "extra"]), lambda c, _: Pair(*c))


def test_nodes_registered_without_key_paths_are_named_from_their_context():
    from legofx.deploy.structure import output_names, tensor_leaves

    value = [Pair(torch.ones(1), (torch.zeros(2),))]
    assert [name for name, _ in tensor_leaves(value)] == ["out[0].sample", "out[0].extra[0]"]
    assert output_names(value) == ["output_0.sample", "output_0.extra.0"]


def test_an_output_named_like_an_input_is_renamed(tmp_path):
    """diffusers' UNet takes ``sample`` and returns ``.sample``: ONNX names must be unique."""

    class Denoiser(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, sample):
            return {"sample": self.conv(sample)}

    result = legofx.export(folded_net(Denoiser().eval()), torch.randn(2, 4, 6, 6), tmp_path / "m.onnx")
    graph = onnx.load(str(result.path)).graph
    assert [i.name for i in graph.input] == ["sample"]
    assert [o.name for o in graph.output] == ["output.sample"]


def test_subnormal_differences_are_rounding_not_error():
    # kernels differ in how they treat float32 subnormals (flushed to zero or kept)
    expected = torch.full((3,), 1e-40)
    assert output_error(torch.zeros(3), expected)[0] == 0.0
    # an error above the subnormal range still counts, as an absolute error where the
    # expected output is subnormal, relative to the scale otherwise
    assert output_error(torch.ones(3), expected)[0] == pytest.approx(1.0)
    assert output_error(torch.full((3,), 3e-37), torch.full((3,), 2e-37))[0] == pytest.approx(0.5)
