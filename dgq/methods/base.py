"""What a quantization method decides, as one interface (`MethodRules`), and the probability
quantizer it describes (`ProbQuant`).

The quantizer (`dgq.quantizer`) owns the mechanics every method shares — scales from calibrated
min/max, K-means groups gathered per index, stacked over timesteps, shaped for each site — and
asks the rules of the config's method (`dgq.methods.rules_for`) the questions on which methods
differ. A new method is a module with one `MethodRules` subclass registered for its config type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dgq.config import Axis, ScaleScope

if TYPE_CHECKING:
    from dgq.calibration import Calibration, SiteInfo


@dataclass(frozen=True)
class MethodInputs:
    """What some methods need besides the calibration: the model's split inputs (`dgq.split`) and
    learned activation ranges (`dgq.act_recon.ActRanges`), handed over by the `Studio`."""

    splits: dict[str, int] = field(default_factory=dict)
    act_ranges: Any = None


@dataclass(frozen=True)
class ProbQuant:
    """How one attention module's softmax output is quantized."""

    bits: int
    log: bool
    start_fp: bool
    dynamic: bool
    scope: ScaleScope
    scale: float | None = None  # static scale (log: s; uniform: step)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scope", ScaleScope(self.scope))


class MethodRules:
    """A method's answers; the defaults are those of full precision (nothing quantized)."""

    def needs_calibration(self, config: Any) -> bool:
        """Whether the config reads calibrated statistics (every quantizing method does)."""
        return False

    def single_set(self, config: Any) -> bool:
        """One parameter set for all timesteps (True) or one per calibrated timestep."""
        return False

    def static_mse_range(self, config: Any) -> bool:
        """A site's range is one MSE search over values sampled from all timesteps (Q-Diffusion)."""
        return False

    def start_fp(self, config: Any, info: SiteInfo) -> bool:
        """Whether the `<start>` token's key row of a cross-attention stays in full precision."""
        return False

    def fixed_act(self, config: Any, calib: Calibration, site: str, t_keys: list[int], bits: int,
                  inputs: MethodInputs) -> dict[int, tuple[str, Any, Any, Any]] | None:
        """Parameters a method sets itself for a site instead of the shared mechanics: {t_key:
        (mode, scale, zero, labels)} for every key in `t_keys`, or None (the default)."""
        return None

    def acts_depend_on_weights(self, config: Any) -> bool:
        """Whether activation parameters depend on the weight bits and rounding (learned with them)."""
        return False

    def groups(self, config: Any) -> int:
        """K, the number of activation groups (1 = per tensor)."""
        return 1

    def axis(self, config: Any) -> Axis:
        """The grouping axis rule (AUTO = the spread metric D_d decides per site and timestep)."""
        return Axis.AUTO

    def fixed_prob(self, config: Any, site: str, bits: int, inputs: MethodInputs) -> ProbQuant | None:
        """A probability quantizer the method sets itself for an attention module instead of
        `prob` (learned step sizes), or None (the default)."""
        return None

    def prob(self, config: Any, calib: Calibration, site: str, t_key: int, bits: int) -> ProbQuant:
        """The quantizer of one attention module's probabilities at one timestep."""
        raise NotImplementedError(f"{type(self).__name__} does not quantize attention probabilities")
