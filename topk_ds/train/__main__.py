from .cli import launcher_main

launcher_main()
