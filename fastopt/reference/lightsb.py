"""Pure-PyTorch reference of Light Schrödinger Bridge (Korotin, Gushchin, Burnaev, "Light Schrödinger Bridge",
ICLR 2024): the formulas of the official implementation (github.com/ngushchin/LightSB, ``src/light_sb.py``,
class ``LightSB``), written as functions of the module's parameters.  It is the executable spec of
:class:`fastopt.ot.LightSB`'s fused kernels and the benchmark baseline (the same broadcasts as the
official code).

Parameters (K components in dimension d, entropic regularization ``epsilon``):

- ``log_alpha_raw`` (K,): ``log_alpha = log_alpha_raw / epsilon`` (the official ``get_log_alpha``);
- ``r`` (K, d): the component means;
- ``S_log_diagonal_matrix`` (K, d) and ``S_rotation_matrix`` (K, d, d), orthogonal: the component
  matrices ``S_k = diag(exp(s_k))`` (``is_diagonal``) or ``S_k = R_k diag(exp(s_k)) R_k^T`` (the official
  ``get_S``).

Functions (x, y: (N, d)):

- :func:`log_C_reference` ``log c(x) = LSE_k [(x^T S_k x + 2 r_k^T x) / (2 eps) + log_alpha_k]``;
- :func:`log_potential_reference` ``log v(y) = LSE_k [log_alpha_k + log N(y; r_k, eps S_k)]``, computed as
  the official ``gmm.log_prob(y) + logsumexp(log_alpha)`` (a ``MixtureSameFamily`` with the
  ``Categorical(logits=log_alpha)`` weights);
- :func:`loss_reference` ``mean_i log c(x_i) - mean_i log v(y_i)``: the training objective of the official
  notebooks (``(-log_potential + log_C).mean()`` for equal batch sizes);
- :func:`sample_reference` ``y | x``: the mixture with weights ``softmax_k((x^T S_k x + 2 r_k^T x) / (2 eps) +
  log_alpha_k)``, means ``r_k + S_k x`` and covariances ``eps S_k`` (the official ``forward``).
"""
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, MultivariateNormal, Normal

__all__ = ["get_S", "log_C_reference", "log_potential_reference", "loss_reference", "sample_reference",
           "conditional_logits"]


def get_S(S_log_diagonal_matrix, S_rotation_matrix, is_diagonal):
    """``exp(s)`` (K, d) when ``is_diagonal``, else ``R diag(exp(s)) R^T`` (K, d, d) (official ``get_S``)."""
    if is_diagonal:
        return torch.exp(S_log_diagonal_matrix)
    R = S_rotation_matrix
    return (R * torch.exp(S_log_diagonal_matrix)[:, None, :]) @ R.transpose(1, 2)


def conditional_logits(x, r, S, log_alpha, epsilon, is_diagonal):
    """The (N, K) logits ``(x^T S_k x + 2 r_k^T x) / (2 eps) + log_alpha_k`` (official ``get_log_C``)."""
    if is_diagonal:
        x_S_x = (x[:, None, :] * S[None, :, :] * x[:, None, :]).sum(dim=-1)
    else:
        x_S_x = (x[:, None, None, :] @ (S[None, :, :, :] @ x[:, None, :, None]))[:, :, 0, 0]
    x_r = (x[:, None, :] * r[None, :, :]).sum(dim=-1)
    return (x_S_x + 2 * x_r) / (2 * epsilon) + log_alpha[None, :]


def log_C_reference(x, log_alpha_raw, r, S_log_diagonal_matrix, S_rotation_matrix, epsilon, is_diagonal=True):
    """``log c_theta(x)`` (N,): the official ``get_log_C``."""
    S = get_S(S_log_diagonal_matrix, S_rotation_matrix, is_diagonal)
    log_alpha = log_alpha_raw / epsilon
    return torch.logsumexp(conditional_logits(x, r, S, log_alpha, epsilon, is_diagonal), dim=-1)


def log_potential_reference(y, log_alpha_raw, r, S_log_diagonal_matrix, S_rotation_matrix, epsilon,
                            is_diagonal=True):
    """``log v_theta(y)`` (N,): the official ``get_log_potential`` (a Gaussian mixture's log-density plus
    ``logsumexp(log_alpha)``)."""
    S = get_S(S_log_diagonal_matrix, S_rotation_matrix, is_diagonal)
    log_alpha = log_alpha_raw / epsilon
    mix = Categorical(logits=log_alpha)
    if is_diagonal:
        comp = Independent(Normal(loc=r, scale=torch.sqrt(epsilon * S)), 1)
    else:
        comp = MultivariateNormal(loc=r, covariance_matrix=epsilon * S)
    gmm = MixtureSameFamily(mix, comp)
    return gmm.log_prob(y) + torch.logsumexp(log_alpha, dim=-1)


def loss_reference(x, y, log_alpha_raw, r, S_log_diagonal_matrix, S_rotation_matrix, epsilon, is_diagonal=True):
    """The LightSB training loss ``mean(log c(x)) - mean(log v(y))`` (x: source batch, y: target batch)."""
    args = (log_alpha_raw, r, S_log_diagonal_matrix, S_rotation_matrix, epsilon, is_diagonal)
    return log_C_reference(x, *args).mean() - log_potential_reference(y, *args).mean()


@torch.no_grad()
def sample_reference(x, log_alpha_raw, r, S_log_diagonal_matrix, S_rotation_matrix, epsilon, is_diagonal=True,
                     sampling_batch_size=1):
    """One sample of ``y | x`` per row of ``x`` (the official ``forward``, in sub-batches of
    ``sampling_batch_size`` rows)."""
    S = get_S(S_log_diagonal_matrix, S_rotation_matrix, is_diagonal)
    log_alpha = log_alpha_raw / epsilon
    out = []
    for i in range(0, x.shape[0], sampling_batch_size):
        xb = x[i:i + sampling_batch_size]
        logits = conditional_logits(xb, r, S, log_alpha, epsilon, is_diagonal)
        if is_diagonal:
            mean = r[None, :, :] + S[None, :, :] * xb[:, None, :]
            comp = Independent(Normal(loc=mean, scale=torch.sqrt(epsilon * S)[None, :, :]), 1)
        else:
            mean = r[None, :, :] + (S[None, :, :, :] @ xb[:, None, :, None])[:, :, :, 0]
            comp = MultivariateNormal(loc=mean, covariance_matrix=epsilon * S)
        out.append(MixtureSameFamily(Categorical(logits=logits), comp).sample())
    return torch.cat(out, dim=0) if out else x.new_empty(x.shape)
