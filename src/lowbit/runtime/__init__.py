"""Running converted models fast: the model-level executor (a plan of native calls per input shape).

See :mod:`lowbit.runtime.executor` (``model(x)``, the off switches, :func:`plan_status`) and
:mod:`lowbit.runtime.plan` (what a plan is made of and which fusions it applies).
"""

from .executor import Executor, executor_of, install, plan_enabled_by_env, plan_status, set_plan
from .plan import CompiledPlan, Unplannable, build_plan

__all__ = ["Executor", "CompiledPlan", "Unplannable", "build_plan", "executor_of", "install", "plan_enabled_by_env",
           "plan_status", "set_plan"]
