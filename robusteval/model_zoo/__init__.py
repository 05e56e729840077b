"""The model zoo: importing this package registers every model."""

from robusteval.model_zoo import baselines  # noqa: F401
from robusteval.model_zoo import cdn, egc, jdm  # noqa: F401
from robusteval.model_zoo import dmae, gmmc, jem  # noqa: F401
from robusteval.model_zoo import cohen  # noqa: F401
