from mcollapse.launch import main

main()
