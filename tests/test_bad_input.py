"""Every bad input raises a clear error and changes nothing: the pipeline stays as it was and keeps working."""

import functools
import math

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

import s2fast
from s2fast import S2Config

BAD_CONFIGS = {
    "omega negative": (dict(omega=-0.1), "omega"),
    "omega nan": (dict(omega=math.nan), "omega"),
    "omega inf": (dict(omega=math.inf), "omega"),
    "omega string": (dict(omega="0.25"), "omega"),
    "drop_ratio zero": (dict(drop_ratio=0.0), "drop_ratio"),
    "drop_ratio one": (dict(drop_ratio=1.0), "drop_ratio"),
    "drop_ratio negative": (dict(drop_ratio=-0.2), "drop_ratio"),
    "num_masks zero": (dict(num_masks=0), "num_masks"),
    "num_masks float": (dict(num_masks=2.0), "num_masks"),
    "protected negative": (dict(protected_blocks=(-1,)), "protected_blocks"),
    "protected repeated": (dict(protected_blocks=(0, 0)), "protected_blocks"),
    "interval reversed": (dict(interval=(0.6, 0.4)), "interval"),
    "interval empty": (dict(interval=(0.5, 0.5)), "interval"),
    "interval below 0": (dict(interval=(-0.1, 0.5)), "interval"),
    "interval above 1": (dict(interval=(0.2, 1.1)), "interval"),
    "interval one number": (dict(interval=(0.2,)), "interval"),
    "seed float": (dict(seed=1.5), "seed"),
    "fork_mode unknown": (dict(fork_mode="fused"), "fork_mode"),
    "batch_branches not bool": (dict(batch_branches=1), "batch_branches"),
    "masks repeat a block": (dict(masks=((1, 1),)), "masks"),
    "masks negative block": (dict(masks=((-2,),)), "masks"),
    "masks and interval": (dict(masks=((1,),), interval=(0.1, 0.9)), "masks or interval"),
    "masks nested for one mask": (dict(masks=(((1,), (2,)),)), "num_masks is 1"),
    "masks flat for three masks": (dict(masks=((1, 2),), num_masks=3), "num_masks=3"),
    "masks not a sequence": (dict(masks=5), "masks"),
    "omega too large for a float": (dict(omega=10**400), "omega must be a finite number.*too large"),
    "interval too large for a float": (dict(interval=(0, 10**400)), "interval must be a finite number"),
    "num_masks too large": (dict(num_masks=10**7), "num_masks must be an integer from 1 to 64"),
    "omega a tensor": (dict(omega=torch.tensor(0.5)), "omega must be a finite number"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_is_rejected_with_its_name(case):
    kwargs, words = BAD_CONFIGS[case]
    with pytest.raises(ValueError, match=words):
        S2Config(**kwargs)


WRAP_TIME = {
    "protected out of range": (dict(protected_blocks=(0, 6)), "protected_blocks names block 6"),
    "protected covers every block": (dict(protected_blocks=tuple(range(6))), "protected_blocks .* leaves nothing to drop"),
    "mask names a protected block": (dict(masks=((0,),) * 4), "protects"),
    "mask names a missing block": (dict(masks=((9,),) * 4), "model has 6 blocks"),
}


@pytest.mark.parametrize("case", WRAP_TIME)
def test_bad_config_for_this_model_changes_nothing(sd3, case):
    kwargs, words = WRAP_TIME[case]
    good = S2Config(omega=0.5, seed=1)
    s2fast.wrap(sd3.pipe, good)
    before = sd3()
    with pytest.raises(ValueError, match=words):
        s2fast.wrap(sd3.pipe, S2Config(**kwargs))
    assert s2fast.config_of(sd3.pipe) is good  # still wrapped with the old config
    torch.testing.assert_close(sd3(), before, atol=0, rtol=0)
    s2fast.unwrap(sd3.pipe)
    with pytest.raises(ValueError, match=words):
        s2fast.wrap(sd3.pipe, S2Config(**kwargs))
    assert s2fast.config_of(sd3.pipe) is None and "forward" not in sd3.pipe.transformer.__dict__


def test_masks_of_the_wrong_length_raise_at_the_call_and_the_pipeline_recovers(sd3):
    stock = sd3()
    s2fast.wrap(sd3.pipe, S2Config(omega=0.5, masks=((1,), (2,), (3,))))
    with pytest.raises(ValueError, match="3 entries, but this call runs 4"):
        sd3(steps=4)
    assert sd3(steps=3).shape == stock.shape  # the right length works
    s2fast.unwrap(sd3.pipe)
    torch.testing.assert_close(sd3(), stock, atol=0, rtol=0)


def test_pipeline_skip_layer_guidance_is_refused(sd3):
    stock = sd3()
    s2fast.wrap(sd3.pipe, S2Config(omega=0.5, seed=1))
    with pytest.raises(ValueError, match="skip_guidance_layers"):
        sd3(skip_guidance_layers=[2])
    s2fast.unwrap(sd3.pipe)
    torch.testing.assert_close(sd3(), stock, atol=0, rtol=0)


def test_unsupported_pipeline_names_the_supported_ones(sd3):
    class MyPipeline(StableDiffusion3Pipeline):  # matched by exact class: a subclass may have another loop
        pass

    other = MyPipeline(**sd3.pipe.components)
    with pytest.raises(ValueError, match="not support MyPipeline; supported pipelines: StableDiffusion3Pipeline, "):
        s2fast.wrap(other)
    assert "forward" not in sd3.pipe.transformer.__dict__
    with pytest.raises(ValueError, match="not support object"):
        s2fast.wrap(object())


def test_wrap_needs_a_config_object(sd3):
    with pytest.raises(TypeError, match="S2Config"):
        s2fast.wrap(sd3.pipe, {"omega": 0.5})


def test_foreign_forward_hook_is_refused(sd3):
    model = sd3.pipe.transformer
    model.forward = functools.partial(type(model).forward, model)  # someone else's instance forward, not a known hook
    try:
        with pytest.raises(ValueError, match="forward is replaced by functools.partial"):
            s2fast.wrap(sd3.pipe)
        assert s2fast.config_of(sd3.pipe) is None and "_s2fast_controller" not in sd3.pipe.__dict__
    finally:
        del model.__dict__["forward"]


def test_trace_of_an_unwrapped_pipeline_raises(sd3):
    with pytest.raises(ValueError, match="not wrapped"):
        s2fast.trace(sd3.pipe)


def test_numpy_scalars_are_accepted_as_python_numbers():
    np = pytest.importorskip("numpy")
    config = S2Config(omega=np.float32(0.25), drop_ratio=np.float64(0.2), num_masks=np.int64(2), seed=np.int32(3),
                      protected_blocks=(np.int64(0), 1), interval=(np.float16(0), 1), batch_branches=np.bool_(True),
                      masks=None)
    python = S2Config(omega=0.25, drop_ratio=0.2, num_masks=2, seed=3, protected_blocks=(0, 1))
    assert config == python and hash(config) == hash(python)
    assert type(config.omega) is float and type(config.num_masks) is int and type(config.seed) is int
    assert all(type(b) is int for b in config.protected_blocks) and type(config.batch_branches) is bool
    assert S2Config(masks=((np.int64(2),), ())).masks == ((2,), ())
