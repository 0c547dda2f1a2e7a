"""FL strategies: one class per algorithm, selected by the ``strategy`` config group (``_target_``)."""
from flmem.strategies.base import RoundFailedError, Strategy
from flmem.strategies.fedavg import FedAvg, FedProx, RunningSum, SumStrategy, aggregate
from flmem.strategies.fedopt import FedAdagrad, FedAdam, FedOpt, FedYogi
from flmem.strategies.robust import CoordinateWise, FedMedian, TrimmedMean

__all__ = ["Strategy", "RoundFailedError", "SumStrategy", "RunningSum", "aggregate", "FedAvg", "FedProx", "FedOpt",
           "FedAdam", "FedYogi", "FedAdagrad", "CoordinateWise", "FedMedian", "TrimmedMean"]
