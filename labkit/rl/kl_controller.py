"""The KL coefficient beta in R = r(x, y) - beta * KL(pi || rho), fixed or adapted towards a target KL.

The KL fed to `update` is the per-sequence sum over response tokens, averaged over the batch (not a
per-token mean). Style tasks adapt beta from 0.15 towards KL = 6 nats; the summarisation runs of the
released code use a fixed beta (0.03 TL;DR, 0.01 CNN/DM).
"""

from dataclasses import dataclass, field


@dataclass
class AdaptiveKLController:
    """Proportional controller that moves beta so that the observed KL approaches `target`.

    e = clip((KL - target) / target, -0.2, 0.2);  beta <- beta * (1 + e * n_episodes / horizon).

    This is the released code's form. The paper writes beta <- beta * (1 + K_beta * e) with K_beta = 0.1;
    the two agree when n_episodes / horizon = 0.1 (e.g. a batch of 1,000 episodes with horizon 10,000).
    Scaling by n_episodes makes the adaptation rate per episode independent of the batch size.
    """

    init_beta: float = 0.15
    """beta at the start of training."""
    target: float = 6.0
    """Target KL(pi || rho) in nats, summed over the response."""
    horizon: int = 10_000
    """Episodes over which a constant 20% error changes beta by a factor of about e^0.2."""
    beta: float = field(init=False)
    """The current coefficient; starts at init_beta."""

    def __post_init__(self):
        self.beta = float(self.init_beta)

    def update(self, current_kl: float, n_episodes: int) -> None:
        """Adapt beta after a batch of n_episodes whose mean summed KL was current_kl."""
        proportional_error = min(max((float(current_kl) - self.target) / self.target, -0.2), 0.2)
        self.beta *= 1.0 + proportional_error * n_episodes / self.horizon

    def state_dict(self) -> dict:
        return {"init_beta": self.init_beta, "target": self.target, "horizon": self.horizon, "beta": self.beta}

    def load_state_dict(self, d: dict) -> None:
        self.init_beta = float(d["init_beta"])
        self.target = float(d["target"])
        self.horizon = int(d["horizon"])
        self.beta = float(d["beta"])


@dataclass
class FixedKLController:
    """A constant beta; `update` exists so that the training loop treats both controllers alike."""

    beta: float
    """The KL coefficient, e.g. 0.03 for TL;DR in the released code."""

    def update(self, current_kl: float, n_episodes: int) -> None:
        """No-op: beta stays fixed."""

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, d: dict) -> None:
        self.beta = float(d["beta"])
