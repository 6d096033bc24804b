"""Triton-side checks of a registry change: every model it introduces exists, is ready and
takes the champion's inputs exactly (names, datatypes, shapes).

Only what the change introduces is checked; models already on the route are not re-checked (a
policy change must not fail because an unrelated challenger is down).
"""

from __future__ import annotations

from gateway.config import ModelRef, RouteConfig
from gateway.dataplane.protocol import TensorSpec, parse_metadata_inputs
from gateway.errors import BadRequest, GatewayError, NotFound
from gateway.explore.policies import build_policy
from gateway.upstream.client import TritonUpstream


class InvalidChange(GatewayError):
    """Well-formed, but refers to a model Triton cannot serve on this route (422)."""

    status = 422


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def signature_mismatches(
    specs: tuple[TensorSpec, ...], champion_specs: tuple[TensorSpec, ...], champion: ModelRef
) -> list[str]:
    """Every way a model's inputs differ from the champion's, each naming the input.

    Exact equality, -1 included: a challenger receives the champion's requests byte for byte,
    so anything the champion accepts must be acceptable to it, and vice versa after a promotion.
    """
    mine = {s.name: s for s in specs}
    theirs = {s.name: s for s in champion_specs}
    problems = [
        f"input '{name}' of champion {champion} is missing" for name in theirs if name not in mine
    ]
    problems += [
        f"input '{name}' is not an input of champion {champion}" for name in mine
        if name not in theirs
    ]
    for name, spec in mine.items():
        other = theirs.get(name)
        if other is None:
            continue
        if spec.datatype != other.datatype:
            problems.append(
                f"input '{name}' datatype {spec.datatype} does not match champion "
                f"{champion}'s {other.datatype}"
            )
        if spec.shape != other.shape:
            problems.append(
                f"input '{name}' shape {_shape(spec.shape)} does not match champion "
                f"{champion}'s {_shape(other.shape)}"
            )
    return problems


class ChangeChecks:
    """The checks against the Triton behind `upstream`."""

    def __init__(self, upstream: TritonUpstream) -> None:
        self.upstream = upstream

    async def validate(self, route: str, new: RouteConfig | None, old: RouteConfig | None
                       ) -> None:
        """Raise the 400/422 the client gets when `new` cannot be served (module docstring)."""
        if new is None:
            return
        try:
            build_policy(new.policy)
        except Exception as exc:
            raise BadRequest(f"policy: {exc}") from None
        champion_changed = old is None or old.champion != new.champion
        known = {c.ref for c in old.challengers} if old is not None else set()
        to_check = [c.ref for c in new.challengers if champion_changed or c.ref not in known]
        if not champion_changed and not to_check:
            return
        if champion_changed:
            champion_specs = await self._servable(new.champion, "champion")
        else:
            champion_specs = await self._inputs(new.champion, "champion")
        for ref in to_check:
            specs = await self._servable(ref, "challenger")
            problems = signature_mismatches(specs, champion_specs, new.champion)
            if problems:
                raise InvalidChange(
                    f"challenger {ref} does not fit route '{route}': " + "; ".join(problems)
                )

    async def _inputs(self, ref: ModelRef, role: str) -> tuple[TensorSpec, ...]:
        try:
            metadata = await self.upstream.metadata(ref.model, ref.version)
        except NotFound as exc:
            raise InvalidChange(f"{role} {exc.message}") from None
        return parse_metadata_inputs(metadata)

    async def _servable(self, ref: ModelRef, role: str) -> tuple[TensorSpec, ...]:
        specs = await self._inputs(ref, role)
        if not await self.upstream.model_ready(ref.model, ref.version):
            raise InvalidChange(f"{role} model '{ref}' is known to Triton but not ready")
        return specs
