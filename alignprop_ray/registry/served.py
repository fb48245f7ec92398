"""The model's code file (MLflow's models-from-code): MLflow runs it to get the model object when it loads
the model, instead of unpickling one. `register` names this file as the `python_model`."""

from mlflow.models import set_model

from alignprop_ray.registry.model import ImageModel

set_model(ImageModel())
