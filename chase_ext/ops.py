"""The native ops: ``torch.ops.chase_ext.*`` and their typed wrappers (``chase_ext._ops``,
which loads the compiled extension). ``import chase_ext.ops`` needs ``chase_ext._C``."""
from ._ops import *  # noqa: F401,F403
from ._ops import KEY_MAX, __all__  # noqa: F401
