import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

import privgrad as pg
from privgrad.data import PoissonLoader

torch.manual_seed(0)
torch.set_flush_denormal(True)  # CPU speed: subnormal floats (e.g. tiny softmax tails) become 0
X, y = load_digits(return_X_y=True)  # 1797 8×8 digits, shipped with scikit-learn
X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
X_train, y_train, X_test, y_test = X[:1500], y[:1500], X[1500:], y[1500:]

model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
# Poisson sampling: every sample joins each logical batch independently with probability q;
# each logical batch (~150 samples) is handed out in physical batches of at most 64.
loader = PoissonLoader(TensorDataset(X_train, y_train), sample_rate=0.1,
                       max_physical_batch_size=64, seed=0)
engine = pg.DPEngine(model, noise_multiplier=1.5, max_grad_norm=1.0,
                     expected_batch_size=loader.expected_batch_size,
                     sample_rate=loader.sample_rate, seed=0)
optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)

for _ in range(30):  # epochs; one epoch is 1/q = 10 logical steps
    for batch in loader:
        for x, t in batch:  # clip and sum each physical batch (none if the batch is empty)
            engine.accumulate(F.cross_entropy(model(x), t, reduction="none"), retain=True)
        trace = engine.step()  # noise once, one privacy event, the private gradient in p.grad
        optimizer.step()
        optimizer.zero_grad()

# What happened to three samples of the last step (NOT private: for inspection only).
clipped = trace.per_sample_grads(clipped=True, samples=[0, 1, 2])
norm_after = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in clipped.values()))
for i in range(3):
    print(f"sample {i}: norm before clipping {trace.norms[i]:.3f}, "
          f"clip factor {trace.clip_factors[i]:.3f}, norm after clipping {norm_after[i]:.3f}")
with torch.no_grad():
    accuracy = (model(X_test).argmax(1) == y_test).float().mean()
print(f"test accuracy {accuracy:.1%} after {engine.steps} private steps, "
      f"ε = {engine.epsilon(delta=1e-5):.2f} at δ = 1e-5")
