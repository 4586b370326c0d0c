"""Built-in methods, one file per method family. Importing this package registers them all.

Every module in this package is imported (in name order), so adding a method is adding one file:
its Config class, decorated with ``@register``, becomes available to ``dt.config(name)``.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
