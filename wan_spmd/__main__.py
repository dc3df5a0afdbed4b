from wan_spmd.cli import main

main()
