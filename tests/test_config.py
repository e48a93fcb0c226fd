import pytest

from lightning_mhc import MHCConfig


def test_defaults_are_the_papers_but_the_measured_init():
    config = MHCConfig()
    assert (config.streams, config.mode, config.sinkhorn_iters, config.init_preset) == (4, "mhc", 20, "onehot")
    assert (config.initial_gate, config.initial_res_logit) == (1.0, 4.0)
    hc = MHCConfig(mode="hc")
    assert (hc.init_preset, hc.initial_gate) == ("paper", 0.01)


@pytest.mark.parametrize(
    ("field", "value", "hint"),
    [
        ("streams", 0, "integer >= 1"),
        ("streams", 2.5, "integer >= 1"),
        ("streams", True, "integer >= 1"),
        ("mode", "mHC", "'mhc', 'hc', 'residual'"),
        ("blocks", "", "dotted path"),
        ("sinkhorn_iters", 0, "integer >= 1"),
        ("gate_init", -0.1, "finite number >= 0"),
        ("gate_init", float("nan"), "finite number"),
        ("init", "lucidrains", "'paper', 'symmetric', 'onehot'"),
        ("readout", "max", "'mean', 'sum', 'learned'"),
        ("granularity", "layer", "'auto', 'sublayer', 'block'"),
        ("kernels", "cuda", "'auto', 'triton', 'torch'"),
        ("recompute", "yes", "True or False"),
        ("recompute_layers", 0, "integer >= 1"),
        ("log_every_n_steps", 0, "integer >= 1"),
    ],
)
def test_invalid_values_name_field_value_and_what_is_allowed(field, value, hint):
    with pytest.raises(ValueError) as info:
        MHCConfig(**{field: value})
    message = str(info.value)
    assert f"MHCConfig.{field}={value!r}" in message
    assert hint in message


def test_round_trips_through_a_plain_dict():
    config = MHCConfig(streams=2, mode="hc", blocks="model.layers", readout="learned")
    assert MHCConfig.from_dict(config.to_dict()) == config


def test_unknown_stored_field_is_named():
    with pytest.raises(ValueError, match="'stream'"):
        MHCConfig.from_dict({"stream": 4})


def test_residual_mode_carries_one_stream():
    assert MHCConfig(mode="residual", streams=4).stream_count == 1
    assert MHCConfig(mode="hc", streams=4).stream_count == 4


def test_differences_names_the_fields_that_differ():
    a, b = MHCConfig(streams=4, log_every_n_steps=10), MHCConfig(streams=2, log_every_n_steps=20)
    assert a.differences(b) == {"streams": (4, 2), "log_every_n_steps": (10, 20)}
    assert a.differences(b, ("mode", "streams")) == {"streams": (4, 2)}
