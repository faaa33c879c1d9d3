// dmakern armv7 entry (ARMv7-A with the Virtualization and Large Physical Address Extensions,
// Cortex-A7/A15), A32 state.
//
// The image starts with the ARM zImage header words (magic at 0x24, start/end at 0x28/0x2c) so that
// U-Boot `bootz` accepts it; QEMU -kernel and the Raspberry Pi firmware just jump to offset 0. Entry
// follows the Linux ARM boot protocol: r0 = 0, r1 = machine type, r2 = DTB, MMU and D-cache off, in
// SVC or HYP mode. Until relocation is done nothing here may use an absolute address: symbols in
// other sections are reached with the PC-relative ADDR macro below.

.syntax unified
.arm
.arch_extension virt

.equ R_ARM_RELATIVE, 23
.equ MODE_USR, 0x10
.equ MODE_FIQ, 0x11
.equ MODE_IRQ, 0x12
.equ MODE_SVC, 0x13
.equ MODE_MON, 0x16
.equ MODE_ABT, 0x17
.equ MODE_HYP, 0x1a
.equ MODE_UND, 0x1b
.equ MODE_SYS, 0x1f
.equ PSR_MODE_MASK, 0x1f
.equ PSR_T, 0x20
.equ PSR_SVC_MASKED, 0x1d3          // SVC mode, A, I and F masked
.equ HCPTR_NO_TRAPS, 0x33ff         // RES1 bits only: no coprocessor, trace or ASE traps
.equ CNTHCTL_PL1_ACCESS, 3          // PL1PCTEN | PL1PCEN: PL1 may use the physical counter/timer
.equ SCTLR_M, (1 << 0)
.equ SCTLR_A, (1 << 1)
.equ SCTLR_C, (1 << 2)
.equ SCTLR_V, (1 << 13)
.equ SCTLR_EE, (1 << 25)
.equ SCTLR_TE, (1 << 30)
.equ BOOT_STACK_SIZE, 0x10000
.equ EXC_STACK_SIZE, 0x1000         // per exception mode (ABT, UND, IRQ, FIQ) and CPU
.equ EXC_STACKS_PER_CPU, 4
.equ MAX_CPUS, 8

// \reg = run-time address of \sym, from a link-time PC-relative offset (valid before relocation).
// The add reads pc as its own address + 8.
.macro ADDR reg, sym
    movw    \reg, #:lower16:(\sym - (.Laddr_pc\@ + 8))
    movt    \reg, #:upper16:(\sym - (.Laddr_pc\@ + 8))
.Laddr_pc\@:
    add     \reg, pc, \reg
.endm

.section .text.head, "ax"
.global _start
_start:
    b       primary_entry               // 0x00: first instruction jumps over the header
    .space  0x20                        // 0x04..0x23: code words of the zImage layout, unused
    .word   0x016f2818                  // 0x24: zImage magic
    .word   0                           // 0x28: start: the image is linked at 0
    .word   __image_size                // 0x2c: end = size the loader must reserve, bss included
    .word   0x04030201                  // 0x30: endianness flag (little-endian)

primary_entry:
    mov     r4, r2                      // DTB physical address (boot protocol: r2)
    mrs     r5, cpsr
    and     r5, r5, #PSR_MODE_MASK      // entry mode, for the banner
    cpsid   aif                         // no mode change: allowed in HYP mode too
    // Park everything but the boot CPU (MPIDR Aff0 zero): loaders that start every core at the
    // entry (QEMU raspi ELF images) must not run the kernel four times. Only Aff0 is tested: the
    // BCM2836 (Pi 2) reports cluster 0xf in Aff1 on its boot CPU, and multi-cluster systems keep
    // their secondaries off until PSCI CPU_ON anyway.
    mrc     p15, 0, r0, c0, c0, 5       // MPIDR
    tst     r0, #0xff
    bne     park
    cmp     r5, #MODE_HYP
    bne     enter_svc
    bl      hyp_setup
    // Leave HYP for SVC with everything masked, resuming at in_svc. SPSR_hyp is written as the
    // current mode's SPSR: the banked form is not allowed from HYP itself.
    mov     r0, #PSR_SVC_MASKED
    msr     spsr_cxsf, r0
    adr     r0, in_svc
    msr     elr_hyp, r0
    eret
enter_svc:
    cps     #MODE_SVC                   // from SVC a no-op; from Monitor or System mode a switch
in_svc:
    // Known PL1 state whatever the loader left: MMU, D-cache and alignment checks off, exceptions
    // taken in A32 state, little-endian, through VBAR (not the high vectors).
    mrc     p15, 0, r0, c1, c0, 0
    bic     r0, r0, #(SCTLR_M | SCTLR_A | SCTLR_C)
    bic     r0, r0, #SCTLR_V
    bic     r0, r0, #(SCTLR_EE | SCTLR_TE)
    mcr     p15, 0, r0, c1, c0, 0
    isb
    ADDR    r0, exception_vectors
    mcr     p15, 0, r0, c12, c0, 0      // VBAR
    isb
    ADDR    r0, __bss_start
    ADDR    r1, __bss_end
    mov     r2, #0
    mov     r3, #0
1:  cmp     r0, r1
    bhs     2f
    stmia   r0!, {r2, r3}               // bss is 16-byte aligned at both ends
    b       1b
2:  ADDR    r0, boot_stacks
    add     sp, r0, #BOOT_STACK_SIZE
    bl      exception_stacks_setup
    ADDR    r6, __image_start
    bl      apply_relocations
    cmp     r0, #0
    bne     park
    mov     r0, r4
    mov     r1, r6
    mov     r2, r5
    bl      dmakern_start_primary
park:
    wfe
    b       park

// Secondary CPUs, started by PSCI CPU_ON in A32 state with r0 = the physical address of their boot
// parameters (src/smp.rs `BootParams`, 64-bit words: MAIR0 | MAIR1 << 32, TTBCR, TTBR0 (root and
// ASID), SCTLR as the boot CPU runs them, the stack top, the CPU index), MMU and caches off, in HYP
// or SVC mode. They take the boot CPU's translation regime as it is: the image is already
// relocated, so symbols are reached PC-relative only until the MMU is on.
.global secondary_entry
secondary_entry:
    cpsid   aif
    mov     r10, r0
    mrs     r0, cpsr
    and     r0, r0, #PSR_MODE_MASK
    cmp     r0, #MODE_HYP
    bne     1f
    bl      hyp_setup
    mov     r0, #PSR_SVC_MASKED
    msr     spsr_cxsf, r0
    adr     r0, 2f
    msr     elr_hyp, r0
    eret
1:  cps     #MODE_SVC
2:  ADDR    r0, exception_vectors
    mcr     p15, 0, r0, c12, c0, 0      // VBAR
    ldr     r0, [r10]
    mcr     p15, 0, r0, c10, c2, 0      // MAIR0
    ldr     r0, [r10, #4]
    mcr     p15, 0, r0, c10, c2, 1      // MAIR1
    ldr     r0, [r10, #8]
    mcr     p15, 0, r0, c2, c0, 2       // TTBCR
    ldr     r0, [r10, #16]
    ldr     r1, [r10, #20]
    mcrr    p15, 0, r0, r1, c2          // TTBR0
    isb
    mov     r0, #0
    mcr     p15, 0, r0, c8, c7, 0       // TLBIALL: whatever firmware left in this CPU's TLB
    mcr     p15, 0, r0, c7, c5, 0       // ICIALLU
    mcr     p15, 0, r0, c7, c5, 6       // BPIALL
    dsb
    isb
    ldr     r0, [r10, #24]
    mcr     p15, 0, r0, c1, c0, 0       // SCTLR: MMU and caches on
    isb
    ldr     sp, [r10, #32]
    ldr     r4, [r10, #40]              // CPU index
    mcr     p15, 0, r4, c13, c0, 4      // TPIDRPRW
    // This CPU's slice of exception_stacks for ABT, UND, IRQ and FIQ.
    ADDR    r0, exception_stacks
    mov     r1, #(EXC_STACK_SIZE * EXC_STACKS_PER_CPU)
    mla     r0, r1, r4, r0
    bl      exception_stacks_from_r0
    mov     r0, r4
    bl      dmakern_start_secondary
    b       park

// HYP mode only: leave PL1 untrapped and give it the counter; guests see the real MIDR/MPIDR.
hyp_setup:
    mov     r0, #0
    mcr     p15, 4, r0, c1, c1, 0       // HCR: no traps, no stage 2
    mcr     p15, 4, r0, c1, c1, 3       // HSTR: no CP15 traps
    movw    r0, #HCPTR_NO_TRAPS
    mcr     p15, 4, r0, c1, c1, 2       // HCPTR
    mov     r0, #CNTHCTL_PL1_ACCESS
    mcr     p15, 4, r0, c14, c1, 0      // CNTHCTL
    mov     r0, #0
    mov     r1, #0
    mcrr    p15, 4, r0, r1, c14         // CNTVOFF: virtual count = physical count
    mrc     p15, 0, r0, c0, c0, 0
    mcr     p15, 4, r0, c0, c0, 0       // VPIDR = MIDR
    mrc     p15, 0, r0, c0, c0, 5
    mcr     p15, 4, r0, c0, c0, 5       // VMPIDR = MPIDR
    isb
    bx      lr

// Give the boot CPU's ABT, UND, IRQ and FIQ modes their own stacks (exception_stacks, CPU 0 slice),
// so a fault report does not depend on the interrupted SVC stack being usable. Called in SVC mode.
exception_stacks_setup:
    ADDR    r0, exception_stacks
// The same from the base of a CPU's slice in r0.
exception_stacks_from_r0:
    add     r0, r0, #EXC_STACK_SIZE
    cps     #MODE_ABT
    mov     sp, r0
    add     r0, r0, #EXC_STACK_SIZE
    cps     #MODE_UND
    mov     sp, r0
    add     r0, r0, #EXC_STACK_SIZE
    cps     #MODE_IRQ
    mov     sp, r0
    add     r0, r0, #EXC_STACK_SIZE
    cps     #MODE_FIQ
    mov     sp, r0
    cps     #MODE_SVC
    bx      lr

// Apply the R_ARM_RELATIVE entries of .rel.dyn (REL: r_offset, r_info; the addend is the word in
// place) and the packed ones of .relr.dyn for load base r6. Returns r0 = 0, or 1 on any other
// .rel.dyn entry (type or symbol index). Clobbers r0-r3, r7 and r12.
apply_relocations:
    ADDR    r0, __rel_start
    ADDR    r1, __rel_end
1:  cmp     r0, r1
    bhs     2f
    ldmia   r0!, {r2, r3}               // r_offset, r_info
    cmp     r3, #R_ARM_RELATIVE         // symbol 0, type 23
    bne     3f
    ldr     r3, [r6, r2]
    add     r3, r3, r6
    str     r3, [r6, r2]
    b       1b
// Then the RELR table (the ELF gABI's SHT_RELR), whose addends are the words in place: an even
// entry is the offset of one word to relocate, after which r7 points; an odd entry is a bitmap of
// which of the 31 words from r7 to relocate (bit i + 1 for word i), after which r7 moves on by 31.
2:  ADDR    r0, __relr_start
    ADDR    r1, __relr_end
    mov     r7, r6
4:  cmp     r0, r1
    bhs     8f
    ldr     r2, [r0], #4
    tst     r2, #1
    bne     5f
    add     r3, r6, r2
    ldr     r12, [r3]
    add     r12, r12, r6
    str     r12, [r3], #4
    mov     r7, r3
    b       4b
5:  lsr     r2, r2, #1
    mov     r3, r7
6:  cmp     r2, #0
    beq     7f
    tst     r2, #1
    ldrne   r12, [r3]
    addne   r12, r12, r6
    strne   r12, [r3]
    lsr     r2, r2, #1
    add     r3, r3, #4
    b       6b
7:  add     r7, r7, #(31 * 4)
    b       4b
8:  mov     r0, #0
    bx      lr
3:  mov     r0, #1
    bx      lr

// Exception vectors. Each stub makes lr the preferred return address (the faulting instruction for
// undef and aborts, the next one for SVC, IRQ and FIQ), saves r0-r12 in a TrapFrame on the current
// mode's stack and enters exception_common with r1 = the vector index. TrapFrame layout (words):
// r0-r12, sp and lr of the interrupted mode, pc, cpsr, padding to keep the stack 8-byte aligned.
.equ FRAME_SP, 52
.equ FRAME_PC, 60
.equ FRAME_CPSR, 64
.equ FRAME_SIZE, 72

.macro VSTUB name, kind, adjust
\name:
    sub     lr, lr, #\adjust
    sub     sp, sp, #FRAME_SIZE
    stmia   sp, {r0-r12}
    mov     r1, #\kind
    b       exception_common
.endm

.section .text.vectors, "ax"
.balign 32                              // VBAR ignores bits 4:0
.global exception_vectors
exception_vectors:
    b       vec_reset                   // 0: not taken through VBAR; listed for completeness
    b       vec_undef                   // 1: undefined instruction
    b       vec_svc                     // 2: supervisor call
    b       vec_pabt                    // 3: prefetch abort
    b       vec_dabt                    // 4: data abort
    b       vec_unused                  // 5: HYP trap, only in the HYP vector table
    b       vec_irq                     // 6
    b       vec_fiq                     // 7

VSTUB vec_reset, 0, 0
VSTUB vec_svc, 2, 0
VSTUB vec_pabt, 3, 4
VSTUB vec_dabt, 4, 8
VSTUB vec_unused, 5, 0
VSTUB vec_irq, 6, 4
VSTUB vec_fiq, 7, 4

// Undef: lr is the instruction + 4 in A32 state, + 2 in T32.
vec_undef:
    sub     sp, sp, #FRAME_SIZE
    stmia   sp, {r0-r12}
    mrs     r0, spsr
    tst     r0, #PSR_T
    subne   lr, lr, #2
    subeq   lr, lr, #4
    mov     r1, #1
    b       exception_common

// Complete the frame: pc, cpsr, and the interrupted mode's sp and lr (read by visiting that mode;
// when it is the exception mode itself, sp is the value before the frame and lr is already the
// exception's). Then call dmakern_exception(frame, kind) on an 8-byte aligned stack and return
// with the possibly updated r0-r12, pc and cpsr.
exception_common:
    str     lr, [sp, #FRAME_PC]
    mrs     r0, spsr
    str     r0, [sp, #FRAME_CPSR]
    and     r2, r0, #PSR_MODE_MASK
    cmp     r2, #MODE_USR
    moveq   r2, #MODE_SYS               // the User registers are the System mode's
    mrs     r3, cpsr
    and     r4, r3, #PSR_MODE_MASK
    cmp     r2, r4
    addeq   r5, sp, #FRAME_SIZE
    moveq   r6, lr
    beq     2f
    cmp     r2, #MODE_HYP               // HYP and Monitor registers are out of reach from here
    cmpne   r2, #MODE_MON
    moveq   r5, #0
    moveq   r6, #0
    beq     2f
    bic     r4, r3, #PSR_MODE_MASK
    orr     r4, r4, r2
    msr     cpsr_c, r4
    mov     r5, sp
    mov     r6, lr
    msr     cpsr_c, r3
2:  add     r7, sp, #FRAME_SP
    stmia   r7, {r5, r6}
    mov     r8, sp                      // callee-saved: the frame, across the call
    bic     sp, sp, #7
    mov     r0, r8
    bl      dmakern_exception
    mov     sp, r8
    ldr     r0, [sp, #FRAME_CPSR]
    msr     spsr_cxsf, r0
    ldr     lr, [sp, #FRAME_PC]
    ldmia   sp, {r0-r12}
    add     sp, sp, #FRAME_SIZE
    movs    pc, lr                      // exception return: cpsr = spsr

.section .noinit.boot_stacks, "aw", %nobits
.balign 16
.global boot_stacks
boot_stacks:
    .space  BOOT_STACK_SIZE * MAX_CPUS
.global exception_stacks
exception_stacks:
    .space  EXC_STACK_SIZE * EXC_STACKS_PER_CPU * MAX_CPUS
