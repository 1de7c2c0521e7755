"""Ragged all-to-all: each device sends each peer a slice of its rows, of any length.

Expert parallelism exchanges the rows routed to each shard's experts. With a padded
`all_to_all` every device sends every peer the worst case (all of its rows), n times the
real rows on n shards; `jax.lax.ragged_all_to_all` sends only the real ones. XLA
implements it on GPU and TPU but not on CPU, so `emulated=True` computes the same result
through an `all_gather` of every device's rows (n times the memory: for tests on CPU,
where it checks the offsets that the real collective is given).
"""

import jax
import jax.numpy as jnp


def ragged_all_to_all(operand: jax.Array, output: jax.Array, input_offsets: jax.Array,
                      send_sizes: jax.Array, output_offsets: jax.Array,
                      recv_sizes: jax.Array, *, axis_name, emulated: bool = False
                      ) -> jax.Array:
  """`jax.lax.ragged_all_to_all` with one slice per peer (offsets and sizes [n]): peer j
  gets operand[input_offsets[j]:][:send_sizes[j]], written at output_offsets[j] of its
  `output` [M, ...]; from peer i this device gets recv_sizes[i] rows."""
  if not emulated:
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes,
                                     output_offsets, recv_sizes, axis_name=axis_name)
  me = jax.lax.axis_index(axis_name)
  gather = lambda x: jax.lax.all_gather(x, axis_name)
  operands = gather(operand)  # n N ...
  starts = gather(input_offsets)[:, me]  # n: where sender i's slice for this device starts
  at = gather(output_offsets)[:, me]  # n: where it lands here
  row = jnp.arange(output.shape[0])
  inside = (row >= at[:, None]) & (row < (at + recv_sizes)[:, None])  # n M
  source = jnp.clip(starts[:, None] + row - at[:, None], 0, operand.shape[0] - 1)
  picked = operands[jnp.arange(operands.shape[0])[:, None], source]  # n M ...
  expand = lambda m: m.reshape(m.shape + (1,) * (operand.ndim - 1))
  received = jnp.sum(jnp.where(expand(inside), picked, 0), axis=0)
  return jnp.where(expand(jnp.any(inside, axis=0)), received, output)
