"""Spectral chains: the ops a chain of convs may keep in the frequency domain, when that
is exact, and where each op runs.

- :mod:`.recognize`: the chain ops, every form an fx graph spells them in (bound by
  signature or schema) — a new chain op starts here;
- :mod:`.writes`: the values an in-place write can be observed through;
- :mod:`.chain`: a chain as the pure analyses see it (members and reads, by name);
- :mod:`.support`: the support lattice and exactness (pure);
- :mod:`.placement`: costs, the min-cut labelling and the grids to try (pure);
- :mod:`.poly`: polynomial fits of activations (pure: tensors in, coefficients out);
- :mod:`.plan`: the plans passes hand on (``ConvPlan``, ``ChainPlan``, ``PolyPlan``);
- :mod:`.members`: chains read off the fx graph (members, components, each chain's reads);
- :mod:`.fits`: the poly plans of a graph's activations, recorded on the example inputs;
- :mod:`.decide`: one chain's grid, placement and decision, with its report text and plan;
- :mod:`.runtime`: the functions a fused chain's graph calls.

Layering: :mod:`.recognize` imports nothing of the package; :mod:`.chain`, :mod:`.support`,
:mod:`.placement` and :mod:`.poly` are pure (no fx); the fx-facing modules
(:mod:`.writes`, :mod:`.plan`, :mod:`.members`, :mod:`.fits`, :mod:`.decide`) may import
:mod:`.recognize`, :mod:`.chain` and :mod:`.plan`, and :mod:`.decide` the pure analyses.
No module imports a pass.

``passes/find_chains.py`` runs these steps and records the decisions; ``passes/fuse_chains.py``
rewrites the fused chains.
"""
