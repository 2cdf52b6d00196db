"""The admin listener's HTTP application (CONTRACT section 12): operational endpoints, the
management and data API under ``/api/``, and the dashboard, served by uvicorn on the daemon's
own event loop."""
