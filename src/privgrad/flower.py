"""Flower integration (optional extra ``privgrad[flower]``; Flower's Message API, 1.41).

* ``DPFedAvgStrategy``: a ``flwr.serverapp.strategy.FedAvg`` whose sampling and
  aggregation are ``privgrad.federated.DPFedAvg``'s: every node joins a round
  independently with probability ``q`` (an empty round still releases noise), each
  client's update (its returned weights minus the global weights) is clipped on its whole
  L2 norm, the sum gets Gaussian noise once and is divided by the expected number of
  clients; the rounds are recorded in the aggregator's ledger and each round's metrics
  carry ``epsilon`` (client-level, at the strategy's δ).
* ``dp_client_app``: a ``flwr.clientapp.ClientApp`` whose clients train locally with
  ``DPEngine`` and Poisson sampling (sample-level DP within each client's data); each
  client keeps its own ledger across rounds (in the node's ``context.state``) and reports
  its sample-level ``epsilon`` with every reply.

The two compose: sample-level DP protects each record inside a client's data;
client-level DP protects each client's whole contribution at the server. Only the model
is private: every reported metric other than ``epsilon`` (losses, norms, fractions
clipped) is computed from individual clients or samples and is NOT private.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn
from torch.utils.data import TensorDataset

from privgrad.accounting.validation import check_delta
from privgrad.data import PoissonLoader
from privgrad.engine import DPEngine
from privgrad.federated import DPFedAvg


class DPFedAvgStrategy(FedAvg):
    """Server-side DP-FedAvg with accounting, as a Flower strategy.

    Args:
        aggregator: The ``DPFedAvg`` (σ, clipping, ``num_clients`` = the number of nodes,
            expected clients per round, ledger).
        delta: δ of the ε reported each round.
        **fedavg_kwargs: Passed to ``FedAvg`` (e.g. ``fraction_evaluate=0.0``); its own
            fixed-fraction training sampling is replaced by Poisson sampling.
    """

    def __init__(self, aggregator: DPFedAvg, delta: float, **fedavg_kwargs: object) -> None:
        fedavg_kwargs.setdefault("min_available_nodes", aggregator.num_clients)
        super().__init__(**fedavg_kwargs)  # type: ignore[arg-type]
        self.aggregator = aggregator
        self.delta = check_delta(delta)
        self._global: dict[str, torch.Tensor] = {}
        # node id → the number of rounds that node was sampled into (not private)
        self.rounds_joined: dict[int, int] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Samples each node with probability ``q`` and sends it the global model."""
        self._global = arrays.to_torch_state_dict()  # integer buffers pass through unchanged
        nodes = sorted(grid.get_node_ids())
        if len(nodes) != self.aggregator.num_clients:
            raise ValueError(
                f"privgrad.flower: {len(nodes)} nodes are connected but the aggregator was "
                f"built for num_clients={self.aggregator.num_clients}; the sampling rate and "
                "the ledger would be wrong. Fix: DPFedAvg(..., num_clients=<number of nodes>)."
            )
        config["server-round"] = server_round
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        chosen = [nodes[i] for i in self.aggregator.sample()]
        for node in chosen:
            self.rounds_joined[node] = self.rounds_joined.get(node, 0) + 1
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)
                for node in chosen]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Global weights + DP-FedAvg aggregate of the clients' updates; ε in the metrics."""
        replies = list(replies)
        valid = [m for m in replies if not m.has_error()]
        floats = {n: g for n, g in self._global.items() if g.is_floating_point()}
        updates = []
        for m in valid:
            weights = m.content[self.arrayrecord_key].to_torch_state_dict()
            updates.append({n: weights[n].to(g.dtype) - g for n, g in floats.items()})
        result = self.aggregator.aggregate(updates, like=floats)
        new = {n: g + result.update[n] if n in floats else g for n, g in self._global.items()}
        metrics = MetricRecord({
            "epsilon": self.aggregator.epsilon(self.delta),
            "clients": result.clients,
            "failures": len(replies) - len(valid),
            "max_norm": result.max_norm,
            "fraction_clipped": float((result.factors < 1).double().mean())
            if result.clients else 0.0,
        })
        client_eps = [float(m.content["metrics"]["epsilon"]) for m in valid
                      if "metrics" in m.content and "epsilon" in m.content["metrics"]]
        if client_eps:
            metrics["client_sample_epsilon_max"] = max(client_eps)
        return ArrayRecord(new), metrics


def dp_client_app(
    model_fn: Callable[[], nn.Module],
    data_fn: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    local_epochs: int,
    lr: float,
    delta: float = 1e-5,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> ClientApp:
    """A ``ClientApp`` whose clients train with ``DPEngine`` (sample-level DP).

    Args:
        model_fn: Builds the model (its ``state_dict`` keys match the server's arrays).
        data_fn: ``data_fn(partition_id, num_partitions) -> (inputs, targets)`` of a client.
        noise_multiplier: σ of the local DP-SGD.
        max_grad_norm: Its flat clipping threshold C.
        expected_batch_size: Its expected logical batch size (Poisson sampling).
        local_epochs: Local epochs per round (``round(1/q)`` steps each).
        lr: Local SGD learning rate.
        delta: δ of the sample-level ε reported with each reply.
        loss_fn: Per-sample loss ``(outputs, targets) -> (B,)``; default cross-entropy.

    Returns:
        The ``ClientApp``; each reply has ``arrays`` and ``metrics`` (``num-examples``,
        ``train_loss``, ``epsilon``: this client's sample-level ε over all its rounds).
    """
    app = ClientApp()
    loss = loss_fn or (lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        part = int(context.node_config["partition-id"])
        x, y = data_fn(part, int(context.node_config["num-partitions"]))
        model = model_fn()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        loader = PoissonLoader(TensorDataset(x, y), expected_batch_size=expected_batch_size)
        engine = DPEngine(model, noise_multiplier, max_grad_norm=max_grad_norm,
                          expected_batch_size=loader.expected_batch_size,
                          sample_rate=loader.sample_rate)
        if "privgrad" in context.state:  # this client's ledger from its earlier rounds
            engine.ledger.load_state_dict(json.loads(context.state["privgrad"]["ledger"]))
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        total, seen = 0.0, 0
        for _ in range(local_epochs):
            for batch in loader:
                opt.zero_grad(set_to_none=True)
                for xb, yb in batch:
                    losses = loss(model(xb), yb)
                    engine.accumulate(losses)
                    total, seen = total + float(losses.detach().sum()), seen + len(yb)
                engine.step()
                opt.step()
        engine.close()
        context.state["privgrad"] = ConfigRecord(
            {"ledger": json.dumps(engine.ledger.state_dict())})
        metrics = MetricRecord({"num-examples": len(y), "train_loss": total / max(seen, 1),
                                "epsilon": engine.epsilon(delta)})
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
        return Message(content=content, reply_to=msg)

    return app
