"""BiTA's draft tree: candidates from the mask predictions, verified in the next pass.

One decoding pass of a BiTA model reads a tree of N tokens per sequence: the root (the
last token the base model chose, not yet cached) and draft candidates, level m holding
the top-`widths[m]` predictions of mask m, hung from the top-1 candidate of the level
before (the root for level 0): the paper's (5, 4, 3) has 12 candidates. Every node
carries a group of mask tokens. The base model's outputs at the nodes verify them: a
candidate is accepted when its parent is and it equals the base model's greedy choice
after its parent. The deepest accepted node ends the accepted path, the base model's
choice after it is the next root (the bonus token), and its mask group drafts the next
tree. The output is exactly the base model's greedy decoding.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class DraftTree:
  widths: tuple[int, ...] = (5, 4, 3)

  def __post_init__(self):
    if not self.widths or any(int(w) < 1 for w in self.widths):
      raise ValueError(f'draft tree widths {self.widths} must be a non-empty tuple of '
                       'positive ints (candidates per level)')

  @functools.cached_property
  def _nodes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """parent, level (-1: root) and rank of each node, the root first."""
    parent, level, rank = [-1], [-1], [0]
    chain = 0  # the top-1 candidate of the previous level
    for m, width in enumerate(self.widths):
      first = len(parent)
      for r in range(width):
        parent.append(chain)
        level.append(m)
        rank.append(r)
      chain = first
    return tuple(np.array(a, np.int32) for a in (parent, level, rank))

  @property
  def size(self) -> int:
    return len(self._nodes[0])

  @property
  def levels(self) -> int:
    return len(self.widths)

  @property
  def parent(self) -> np.ndarray:
    return self._nodes[0]

  @property
  def depth(self) -> np.ndarray:
    return self._nodes[1] + 1

  @functools.cached_property
  def paths(self) -> np.ndarray:
    """[N, levels + 1]: the nodes from the root to each node, padded with the node."""
    paths = np.zeros((self.size, self.levels + 1), np.int32)
    for u in range(self.size):
      chain = [u]
      while self.parent[chain[-1]] >= 0:
        chain.append(int(self.parent[chain[-1]]))
      chain.reverse()
      paths[u] = chain + [u] * (self.levels + 1 - len(chain))
    return paths

  @functools.cached_property
  def visible(self) -> np.ndarray:
    """[N, N] bool: node i sees node j (an ancestor of i, or i itself)."""
    visible = np.zeros((self.size, self.size), bool)
    for u in range(self.size):
      visible[u, self.paths[u][:self.depth[u] + 1]] = True
    return visible

  def tokens(self, root: jax.Array, drafts: jax.Array) -> jax.Array:
    """root [b], drafts [b, M, max width] (ranked predictions per mask) -> nodes [b, N]."""
    _, level, rank = self._nodes
    candidates = drafts[:, np.maximum(level, 0), rank]
    return jnp.where(level < 0, root[:, None], candidates).astype(jnp.int32)

  def accept(self, tokens: jax.Array, greedy: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Node tokens and the base model's greedy choice after each node, [b, N] ->
    (the deepest accepted node [b], the accepted path [b, levels + 1] of node indices)."""
    accepted = [jnp.ones(tokens.shape[:1], bool)]
    for u in range(1, self.size):
      p = int(self.parent[u])
      accepted.append(accepted[p] & (tokens[:, u] == greedy[:, p]))
    accepted = jnp.stack(accepted, axis=1)
    last = jnp.argmax(jnp.where(accepted, self.depth, -1), axis=1)
    return last, jnp.asarray(self.paths)[last]
