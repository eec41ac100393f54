"""The channel-selection recipes the benchmarks compare: name -> ``ChaseOptimizer``
keywords added to the SPEC defaults. Shared by ``speed_resnet50.py`` (speed) and
``recipe_accuracy.py`` (accuracy on the demo), so both speak of the same recipes. Plain
data and two helpers, no imports: loadable by file path without putting ``benchmarks/``
on ``sys.path``.
"""

RECIPES = {
    "spec": {},
    "round8": {"round_to": 8},
    "round16": {"round_to": 16},
    "round32": {"round_to": 32},
    "round64": {"round_to": 64},
    "coupled": {"coupled_channels": True},
    "coupled_round8": {"coupled_channels": True, "round_to": 8},
    # squeeze-and-excitation / GLU gates: the gate's layer loses the channels of the map it scales
    "gated": {"gated_channels": True},
    "coupled_gated": {"coupled_channels": True, "gated_channels": True},
    # grouped convs (ResNeXt, RegNet): the convs around them shrink, every conv group alike
    "grouped": {"grouped_channels": True},
    "coupled_grouped": {"coupled_channels": True, "grouped_channels": True},
    "all_joins": {"coupled_channels": True, "gated_channels": True, "grouped_channels": True},
    # round_to counts per conv group there: each conv group keeps a multiple of 8 channels
    "coupled_grouped_round8": {"coupled_channels": True, "grouped_channels": True, "round_to": 8},
    "all_joins_round8": {"coupled_channels": True, "gated_channels": True, "grouped_channels": True, "round_to": 8},
    # concatenations (DenseNet, Inception, SqueezeNet): the layers whose outputs are concatenated
    # shrink, and the layers reading the concatenations lose those spans
    "concat": {"concat_channels": True},
    "concat_round8": {"concat_channels": True, "round_to": 8},
    # the latency table is measured at the throughput batch of the run (latency_batch set there)
    "latency": {"channel_allocation": "latency"},
    "latency_coupled": {"channel_allocation": "latency", "coupled_channels": True},
    # floors at a quarter of each group (beta 0.5 at S_c 0.5): the time-only split cut the demo
    # VGG's first convs to 1-3 channels under the SPEC floor (beta 0.2)
    "latency_beta05": {"channel_allocation": "latency", "min_channel_ratio": 0.5},
    # both: block outputs shrink too, removal goes where the table says time goes, quarter floors
    "latency_coupled_beta05": {"channel_allocation": "latency", "coupled_channels": True, "min_channel_ratio": 0.5},
}

# round_to 16/32/64 ran within 1% of round_to 8 on the H200 (2026-12-04): named, not default.
# "latency" and latency_coupled are named only: the SPEC floors cost 2.2 points on the demo
# (time-only split); "coupled" alone only where asked (coupled_round8 ran faster on the H200).
# latency_coupled_beta05 is the candidate for the GPU target (CPU, S_c 0.4: 2.75x dense,
# activation ratio 1.70, latency_beta05 1.97x / 1.27); one latency table keeps the GPU run
# short (each table is ~30 s there), so latency_beta05 is named only.
DEFAULT_RECIPES = ("spec", "round8", "coupled_round8", "latency_coupled_beta05")


def uses_latency_table(recipe: dict) -> bool:
    return recipe.get("channel_allocation") == "latency"


def latency_table_name(recipe: dict) -> str:
    """One cached table per set of channel groups: the latency recipes with the same groups
    share it (a table measured for lower floors also serves higher ones)."""
    joins = [j for j in ("coupled", "gated", "grouped", "concat") if recipe.get(f"{j}_channels")]
    return "-".join(["table", *joins]) + ".json"
