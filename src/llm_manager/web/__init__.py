"""The dashboard: a static page (``static/``) served by the management app at ``/ui``."""
