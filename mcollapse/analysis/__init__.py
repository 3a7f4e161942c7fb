"""Pure numpy/torch analysis on arrays; no model code lives here."""
