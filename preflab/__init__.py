"""preflab: an RLHF workbench, from calibrated raters to a safely promoted policy.

Importing the package stays light: heavy dependencies (torch, FastAPI, SQLAlchemy)
are imported inside the modules that need them.
"""

__version__ = "0.1.0"
