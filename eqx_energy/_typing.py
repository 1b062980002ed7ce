"""jaxtyping aliases with DESIGN.md's axis letters.

b batch, s context tokens, c context width, h action horizon, a energy action dims,
p padded model action dims, d hidden width. Masks are True = valid.
"""

from jaxtyping import Array, Bool, Float

Context = Float[Array, "s c"]
ContextMask = Bool[Array, "s"]
Actions = Float[Array, "h a"]
BatchContext = Float[Array, "b s c"]
BatchContextMask = Bool[Array, "b s"]
BatchActions = Float[Array, "b h a"]
PaddedActions = Float[Array, "b h p"]
Scalar = Float[Array, ""]
