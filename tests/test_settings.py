"""One source of options: :class:`specfx.pipeline.Settings` and the resolver that
``optimize``, ``explain`` and the ``torch.compile`` backend share
(:func:`specfx.api.resolve_settings`)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
import torch.nn as nn

import specfx
from specfx import api
from specfx.cost_model import CostProfile
from specfx.pipeline import Settings


def test_optimize_and_explain_take_every_settings_field_with_its_default():
    """Their keyword arguments are Settings' fields (kept explicit for help() and IDEs):
    a field added to Settings, or a default changed, must be changed there too."""
    for function in (specfx.optimize, specfx.explain):
        parameters = inspect.signature(function).parameters
        for field in dataclasses.fields(Settings):
            assert field.name in parameters, f"{function.__name__} lacks {field.name}"
            assert parameters[field.name].kind is inspect.Parameter.KEYWORD_ONLY
            assert parameters[field.name].default == field.default, field.name


def test_options_become_settings():
    assert api.resolve_settings({"policy": "never"}, ()).policy == "never"
    assert api.resolve_settings(None, ()).policy == "auto"
    chain = api.resolve_settings({"spectral_activation": "poly", "chains": False, "poly_degree": 3}, ())
    assert (chain.spectral_activation, chain.chains, chain.poly_degree) == ("poly", False, 3)


def test_unknown_options_are_named_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown specfx option\(s\) 'bogus', 'fusion_level'.*'policy'"):
        api.resolve_settings({"policy": "auto", "fusion_level": "exact", "bogus": 1}, ())


@pytest.mark.parametrize("options, message", [
    ({"policy": "fastest"}, "policy must be one of"),
    ({"spectral_activation": "relu"}, "spectral_activation must be one of"),
    ({"chains": 1}, "chains must be True or False"),
    ({"poly_degree": 0}, "poly_degree must be an int >= 1"),
    ({"poly_degree": True}, "poly_degree must be an int >= 1"),
])
def test_bad_values_name_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        api.resolve_settings(options, ())


def test_profile_follows_the_inputs_device_unless_given(monkeypatch):
    asked = []
    marker = CostProfile(fft_gflops=1.0)
    monkeypatch.setattr(api, "profile_for_device", lambda device: asked.append(device) or marker)
    assert api.resolve_settings({}, (torch.empty(1, device="meta"),)).profile is marker
    assert api.resolve_settings({"profile": None}, ([3, torch.empty(1)],)).profile is marker
    assert asked == [torch.device("meta"), torch.device("cpu")]
    given = CostProfile(fft_gflops=2.0)
    assert api.resolve_settings({"profile": given}, (torch.empty(1),)).profile is given
    assert len(asked) == 2


def test_optimize_explain_and_backend_resolve_the_same_way(monkeypatch):
    """All three go through resolve_settings, which loads the profile once (the settings
    are never rebuilt with another profile afterwards)."""
    seen = []
    resolve = api.resolve_settings
    monkeypatch.setattr(api, "resolve_settings", lambda options, inputs: seen.append(dict(options)) or
                        resolve(options, inputs))
    from specfx import backend
    monkeypatch.setattr(backend, "resolve_settings", api.resolve_settings)
    conv, x = nn.Conv2d(2, 2, 3, padding=1), torch.randn(1, 2, 8, 8)
    specfx.explain(conv, (x,), policy="never", chains=False)
    specfx.optimize(conv, (x,), policy="never", poly_degree=3)
    assert seen[0] == {"policy": "never", "profile": None, "spectral_activation": "exact", "chains": False,
                       "poly_degree": 2, "measure_budget_s": None}
    assert seen[1]["poly_degree"] == 3

    gm = torch.fx.symbolic_trace(conv)
    backend.specfx_backend(gm, [x], options={"policy": "never"})
    assert seen[2] == {"policy": "never"}


def test_bad_settings_fail_before_the_model_runs():
    class Raises(nn.Module):
        def forward(self, x):
            raise AssertionError("the model ran")

    with pytest.raises(ValueError, match="policy"):
        specfx.optimize(Raises(), (torch.randn(2),), policy="fast")
    with pytest.raises(ValueError, match="poly_degree"):
        specfx.explain(Raises(), (torch.randn(2),), poly_degree=0)


def test_settings_by_hand_use_this_machines_profile(tmp_path, monkeypatch):
    path = tmp_path / "profile.json"
    CostProfile(fft_gflops=12.5).save(path)
    monkeypatch.setenv("SPECFX_PROFILE", str(path))
    assert Settings().profile == CostProfile(fft_gflops=12.5)
    assert Settings(profile=CostProfile()).profile == CostProfile()
