"""Anomaly detectors sharing one interface: fit(dataset), predict(images), save(dir), load(dir)."""
from slsg.detectors.base import Detector, ModelError, load_detector, register, resolve_model_dir
from slsg.detectors.evaluation import Evaluation, evaluate, measure_throughput
from slsg.detectors.memory_bank import MemoryBankConfig, MemoryBankDetector

__all__ = ["Detector", "Evaluation", "MemoryBankConfig", "MemoryBankDetector", "ModelError", "evaluate",
           "load_detector", "measure_throughput", "register", "resolve_model_dir"]
