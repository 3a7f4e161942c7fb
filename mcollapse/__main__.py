from mcollapse.cli import main

main()
