"""maskaudit: does an image classifier look where a clinician would look?"""

__version__ = "0.1.0"
