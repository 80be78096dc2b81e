"""Sample tools, and the ``directory`` plugin of Lamina's own ``lamina.tools`` entry point.

- ``lookup_employee``: an ``@tool`` function; risk read; role ``employee``.
- ``servicedesk-create_ticket``: a semantic-kernel class; risk high; role ``employee``
  or ``servicedesk.agent``.

Importing this package is cheap: semantic-kernel is imported only when
:func:`directory_plugin` builds the service-desk tool.
"""

from __future__ import annotations

import importlib.util
import logging

from tools.plugins import Tool
from tools.samples.employee_directory import lookup_employee

__all__ = ["directory_plugin", "lookup_employee"]

logger = logging.getLogger(__name__)


def directory_plugin() -> list[Tool]:
    """The sample tools; ``pyproject.toml`` points the ``directory`` entry point here.

    Without semantic-kernel (the optional ``lamina[sk]`` extra) only the
    directory lookup is offered.
    """
    if importlib.util.find_spec("semantic_kernel") is None:
        logger.warning("semantic-kernel is not installed: the sample service-desk tool is off")
        return [lookup_employee]

    from tools.samples.service_desk import ServiceDeskPlugin
    from tools.sk_adapter import kernel_plugin_tools

    return [lookup_employee, *kernel_plugin_tools(ServiceDeskPlugin(), plugin_name="servicedesk")]
