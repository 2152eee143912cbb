"""PruningPlan: the plain, JSON-serialisable seam between deciding what to prune and cutting it.

A plan lists, for every layer of the dense model, the GQA groups and MLP channels to *keep*. An empty
list removes that block; a layer with both blocks empty is deleted. Plans never hold weights or scores,
so they can be written by hand, replayed, diffed and plotted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from torch import nn

from llama_pruning import atomic
from llama_pruning.models.arch import ModelSpec, count_params, decoder_layers, model_spec

PLAN_FILENAME = "pruning_plan.json"


class PlanError(ValueError):
    """A plan that does not fit the model it is applied to, or a file that is not a plan."""


def is_int(value: object) -> bool:
    """An integer that is not a bool (JSON true, or a caller's True, is not the integer 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _index_lists(data: dict, key: str, limit: int) -> None:
    """`data[key]` must be a list of lists of distinct integers in [0, limit)."""
    value = data[key]
    if not isinstance(value, list):
        raise PlanError(f"plan field {key}: expected a list per layer, got {type(value).__name__}")
    for layer, indices in enumerate(value):
        if not isinstance(indices, list):
            raise PlanError(f"plan field {key}[{layer}]: expected a list of indices, got {type(indices).__name__}")
        for position, index in enumerate(indices):
            if not is_int(index) or not 0 <= index < limit:
                raise PlanError(f"plan field {key}[{layer}][{position}]: expected an integer in [0, {limit}), "
                                f"got {json.dumps(index)}")
        if len(set(indices)) != len(indices):
            raise PlanError(f"plan field {key}[{layer}]: duplicate indices")


def check_plan_dict(data: object) -> None:
    """Raise PlanError, naming the field, unless `data` has every plan field with the right type and range."""
    if not isinstance(data, dict):
        raise PlanError(f"not a pruning plan: expected a JSON object, got {type(data).__name__}")
    names = {f.name for f in fields(PruningPlan)}
    unknown = sorted(set(data) - names)
    missing = sorted(n for n in ("base_model", "spec", "attn_groups", "mlp_channels") if n not in data)
    if unknown or missing:
        raise PlanError(f"not a pruning plan: unknown fields {unknown}, missing fields {missing}")
    if not isinstance(data["base_model"], str):
        raise PlanError(f"plan field base_model: expected a string, got {json.dumps(data['base_model'])}")
    spec = data["spec"]
    if not isinstance(spec, dict) or set(spec) != {f.name for f in fields(ModelSpec)}:
        raise PlanError(f"plan field spec: expected an object with the fields {[f.name for f in fields(ModelSpec)]}")
    for f in fields(ModelSpec):
        value = spec[f.name]
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        ok = (isinstance(value, str) if kind == "str" else isinstance(value, bool) if kind == "bool"
              else is_int(value) and value >= 1)
        if not ok:
            raise PlanError(f"plan field spec.{f.name}: expected {'a positive integer' if kind == 'int' else 'a ' + kind}, "
                            f"got {json.dumps(value)}")
    _index_lists(data, "attn_groups", spec["num_kv_heads"])
    _index_lists(data, "mlp_channels", spec["intermediate_size"])
    for key in ("attn_groups", "mlp_channels"):
        if len(data[key]) != spec["num_layers"]:
            raise PlanError(f"plan field {key}: lists {len(data[key])} layers, spec.num_layers is {spec['num_layers']}")
    flags = data.get("bias_compensation", [])
    if not isinstance(flags, list) or not all(isinstance(flag, bool) for flag in flags):
        raise PlanError("plan field bias_compensation: expected a list of true/false, one per layer")
    if flags and len(flags) != spec["num_layers"]:
        raise PlanError(f"plan field bias_compensation: lists {len(flags)} flags, spec.num_layers is {spec['num_layers']}")
    if not isinstance(data.get("metadata", {}), dict):
        raise PlanError(f"plan field metadata: expected an object, got {type(data['metadata']).__name__}")


@dataclass
class PruningPlan:
    """Per dense layer: kept attention groups and kept MLP channels; `[]` removes the block."""

    base_model: str
    spec: dict
    attn_groups: list[list[int]]
    mlp_channels: list[list[int]]
    bias_compensation: list[bool] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    # construction --------------------------------------------------------------------------------
    @classmethod
    def dense(cls, spec: ModelSpec, base_model: str) -> PruningPlan:
        """The plan that keeps everything (the starting point of every selection)."""
        return cls(
            base_model=base_model,
            spec=spec.signature(),
            attn_groups=[list(range(spec.num_kv_heads)) for _ in range(spec.num_layers)],
            mlp_channels=[list(range(spec.intermediate_size)) for _ in range(spec.num_layers)],
        )

    @classmethod
    def from_dict(cls, data: dict) -> PruningPlan:
        """A plan from its JSON form, checked field by field (PlanError naming the field otherwise)."""
        check_plan_dict(data)
        plan = cls(**data)
        if not plan.kept_layers:
            raise PlanError("the plan removes every layer: nothing would be left of the model")
        return plan

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        """Read a plan written by `save`; a clear error for a missing or malformed file."""
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file not found: {path}")
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise PlanError(f"{path} is not valid JSON: {str(err).splitlines()[0][:200]}") from None
        except OSError as err:
            raise PlanError(f"cannot read plan {path}: {err.strerror or err}") from None
        if not isinstance(data, dict):
            raise PlanError(f"{path} does not hold a pruning plan")
        try:
            return cls.from_dict(data)
        except PlanError as err:
            raise PlanError(f"{path}: {err}") from None

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON, atomically."""
        atomic.write_text(path, json.dumps(self.to_dict(), indent=1))

    # derived views ---------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.attn_groups)

    @property
    def removed_layers(self) -> list[int]:
        """Dense indices of layers deleted entirely (both blocks empty)."""
        return [i for i in range(self.num_layers) if not self.attn_groups[i] and not self.mlp_channels[i]]

    @property
    def kept_layers(self) -> list[int]:
        removed = set(self.removed_layers)
        return [i for i in range(self.num_layers) if i not in removed]

    def has_bias(self, layer: int) -> bool:
        """Whether compensation adds an o_proj / down_proj bias to this dense layer."""
        return bool(self.bias_compensation) and self.bias_compensation[layer]

    def layout(self) -> list[dict]:
        """Per surviving layer shapes, as the pruned modeling code reads them from the config."""
        spec = self.model_spec()
        return [
            {
                "num_key_value_heads": len(self.attn_groups[i]),
                "intermediate_size": len(self.mlp_channels[i]),
                "o_proj_bias": spec.o_bias or (self.has_bias(i) and bool(self.attn_groups[i])),
                "down_proj_bias": spec.mlp_bias or (self.has_bias(i) and bool(self.mlp_channels[i])),
            }
            for i in self.kept_layers
        ]

    def model_spec(self) -> ModelSpec:
        """The dense geometry the plan was made for."""
        return ModelSpec(**self.spec)

    # checks ----------------------------------------------------------------------------------------
    def validate(self, spec: ModelSpec) -> None:
        """Raise PlanError unless the plan was made for this geometry and every index is valid."""
        if self.spec != spec.signature():
            theirs = spec.signature()
            diff = {k: (v, theirs.get(k)) for k, v in self.spec.items() if theirs.get(k) != v}
            raise PlanError(f"plan was made for another model ({self.base_model}); mismatched (plan, model): {diff}")
        if len(self.attn_groups) != spec.num_layers or len(self.mlp_channels) != spec.num_layers:
            raise PlanError(f"plan lists {len(self.attn_groups)} layers, the model has {spec.num_layers}")
        if self.bias_compensation and len(self.bias_compensation) != spec.num_layers:
            raise PlanError("bias_compensation must list one flag per layer")
        for kind, lists, limit in (
            ("attention group", self.attn_groups, spec.num_kv_heads),
            ("MLP channel", self.mlp_channels, spec.intermediate_size),
        ):
            for layer, idx in enumerate(lists):
                if len(set(idx)) != len(idx):
                    raise PlanError(f"layer {layer}: duplicate {kind} indices")
                bad = [i for i in idx if not isinstance(i, int) or not 0 <= i < limit]
                if bad:
                    raise PlanError(f"layer {layer}: {kind} indices out of range [0, {limit}): {bad[:5]}")
        if not self.kept_layers:
            raise PlanError("the plan removes every layer: nothing would be left of the model")

    # parameter accounting ---------------------------------------------------------------------------
    def param_report(self, model: nn.Module) -> dict:
        """Parameters before/after per layer and in total, exact to the unit (tied weights counted once).

        `model` is the dense model the plan was made for; its non-layer parameters (embeddings, final
        norm, untied lm_head) are read from it rather than assumed.
        """
        spec = model_spec(model)
        self.validate(spec)
        layers = decoder_layers(model)
        dense_layers = [count_params(layer) for layer in layers]
        other = count_params(model) - sum(dense_layers)
        rows = []
        for i in range(spec.num_layers):
            groups, channels = len(self.attn_groups[i]), len(self.mlp_channels[i])
            extra_bias = spec.hidden_size * self.has_bias(i) * ((groups > 0 and not spec.o_bias) +
                                                               (channels > 0 and not spec.mlp_bias))
            after = (
                spec.attn_block_params(groups)
                + spec.mlp_block_params(channels)
                + spec.hidden_size * ((groups > 0) + (channels > 0))
                + extra_bias
            )
            rows.append({"layer": i, "attn_groups": groups, "mlp_channels": channels,
                         "params_before": dense_layers[i], "params_after": after})
        before = other + sum(dense_layers)
        after = other + sum(r["params_after"] for r in rows)
        return {
            "layers": rows,
            "params_before": before,
            "params_after": after,
            "layer_params_before": sum(dense_layers),
            "layer_params_after": sum(r["params_after"] for r in rows),
            "removed_layers": self.removed_layers,
        }
