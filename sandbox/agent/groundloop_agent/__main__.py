import os

from .agent import main
from .init import make_undumpable, run_as_init

if os.getpid() == 1:  # the container's init (no docker-init: see init.py)
    run_as_init(main)
else:
    make_undumpable()
    main()
