"""Federated digits with Flower: 5 clients, sample-level DP on each client, DP-FedAvg at the server.

Run (needs the extra: pip install -e ".[flower]"):

    .venv/bin/python examples/federated_digits.py

Flower's simulation engine runs 5 ClientApps (Ray actors) and the ServerApp in this
process. Each client holds a fifth of the 80% training split of scikit-learn's digits and
trains locally with privgrad's DPEngine (Poisson sampling, σ calibrated so that its
sample-level ε over all rounds stays within the budget). The server samples each client
with probability q per round and aggregates with privgrad's DP-FedAvg (whole-update
clipping, Gaussian noise once, client-level ledger). The script prints the test accuracy
of the final global model, the clients' sample-level ε and the server's client-level ε.
"""

from __future__ import annotations

import functools
import os
import sys

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from torch import nn  # noqa: E402

import privgrad as pg  # noqa: E402
from privgrad.flower import DPFedAvgStrategy, dp_client_app  # noqa: E402

CLIENTS = 5


def model_fn() -> nn.Module:
    """The global model: multinomial logistic regression on the 64 pixels."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 10))  # multinomial logistic regression


@functools.cache
def split() -> tuple[np.ndarray, ...]:
    """``X_train, X_test, y_train, y_test`` of digits (80/20, stratified, fixed)."""
    X, y = load_digits(return_X_y=True)
    X = (X / 8.0 - 1.0).astype(np.float32)  # pixels 0..16 → [-1, 1] (public constants)
    return tuple(train_test_split(X, y, test_size=0.2, random_state=0, stratify=y))


def client_data(part: int, parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``part``'s shard of the training split."""
    X_train, _, y_train, _ = split()
    return torch.from_numpy(X_train[part::parts]), torch.from_numpy(y_train[part::parts])


def run(rounds: int = 8, epsilon: float = 3.0, delta: float = 1e-5, local_epochs: int = 2,
        batch: int = 64, lr: float = 2.0, server_sigma: float = 0.01,
        clients_per_round: float = 4.0, seed: int | None = None) -> dict:
    """Runs the federation; returns accuracy, ε values and per-round metrics."""
    smallest = min(len(client_data(c, CLIENTS)[1]) for c in range(CLIENTS))
    q = batch / smallest  # the largest sampling rate of any client
    steps = rounds * local_epochs * round(1 / q)  # a client sampled in every round
    sigma = pg.accounting.calibrate_noise(epsilon, delta, q, steps)
    aggregator = pg.federated.DPFedAvg(server_sigma, max_norm=1.0, num_clients=CLIENTS,
                                       clients_per_round=clients_per_round, seed=seed)
    strategy = DPFedAvgStrategy(aggregator, delta, fraction_evaluate=0.0)
    client_app = dp_client_app(model_fn, client_data, noise_multiplier=sigma, max_grad_norm=1.0,
                               expected_batch_size=batch, local_epochs=local_epochs, lr=lr,
                               delta=delta)
    out: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        initial = ArrayRecord(model_fn().state_dict())
        out["result"] = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds,
                                       timeout=120, train_config=ConfigRecord({}))

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=CLIENTS,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "log_to_driver": False}},
                   verbose_logging=False)
    result = out["result"]
    model = model_fn()
    model.load_state_dict(result.arrays.to_torch_state_dict())
    _, X_test, _, y_test = split()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(X_test)).argmax(1).numpy() == y_test).mean())
    per_round = {r: dict(m) for r, m in sorted(result.train_metrics_clientapp.items())}
    sample_eps = max(m.get("client_sample_epsilon_max", 0.0) for m in per_round.values())
    return {"test_accuracy": acc, "client_level_epsilon": aggregator.epsilon(delta),
            "sample_level_epsilon": sample_eps, "sample_level_budget": epsilon,
            "local_noise_multiplier": sigma, "rounds": per_round,
            "most_rounds_joined": max(strategy.rounds_joined.values(), default=0)}


if __name__ == "__main__":
    res = run()
    for r, m in res["rounds"].items():
        print(f"round {r}: clients {int(m['clients'])}, failures {int(m['failures'])}, "
              f"client-level ε {m['epsilon']:.2f}")
    print(f"test accuracy {res['test_accuracy']:.1%}; sample-level ε <= "
          f"{res['sample_level_epsilon']:.2f} (budget {res['sample_level_budget']}), "
          f"client-level ε = {res['client_level_epsilon']:.1f}, δ = 1e-5")
    sys.exit(0)
