// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {Address} from "@openzeppelin/contracts/utils/Address.sol";
import {Nonces} from "@openzeppelin/contracts/utils/Nonces.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {Math} from "@openzeppelin/contracts/utils/math/Math.sol";
import {IModelRegistry} from "./interfaces/IModelRegistry.sol";
import {INodeRegistry} from "./interfaces/INodeRegistry.sol";

/// @title NodeRegistry
/// @notice Nodes bond ETH stake proportional to their declared capacity. The node key (the address of the
/// node's secp256k1 libp2p peer key) proves control by signing an EIP-712 Registration for its operator.
/// Slashed stake stays locked in this contract for good (it is burned in effect).
///
/// Stage assignment (unextractability): a node serves a stage of a model only once its operator assigned it with
/// `assignStage`. An operator holds at most one stage per model across all its node keys (several of its node keys
/// may replicate that one stage), and every assignment must be backed by `stakePerStage` of the node's own bonded,
/// slashable stake on top of its capacity stake. Collecting all P stages of a model therefore takes P operators
/// and P stage stakes locked for the unbonding delay. A node must leave all its stages before it can unbond.
contract NodeRegistry is AccessControl, EIP712, Nonces, ReentrancyGuardTransient, INodeRegistry {
    /// @notice Lifecycle of a node.
    enum Status {
        None,
        Active,
        Unbonding,
        Withdrawn
    }

    /// @notice A registered node.
    struct Node {
        address operator; // receives shares and the returned stake
        Status status;
        uint64 unbondsAt; // when withdraw becomes possible (set by beginUnbond; kept after withdraw)
        uint64 bondedAt; // when the current bond (registration) started
        uint256 capacity; // declared capacity, in the unit that stakePerUnit prices
        uint256 stake; // bonded stake in wei, after slashing
    }

    /// @notice A node key's assignment to one stage of one model.
    struct StageSlot {
        bool assigned;
        uint16 stage;
    }

    /// @notice An operator's stage of one model, held while at least one of its node keys is assigned to it.
    struct OperatorSlot {
        uint16 stage;
        uint32 nodes; // node keys of the operator assigned to `stage` (0: the operator holds no stage of the model)
    }

    /// @notice EIP-712 type hash of Registration.
    bytes32 public constant REGISTRATION_TYPEHASH =
        keccak256("Registration(address operator,address nodeKey,uint256 capacity,uint256 nonce)");

    /// @notice Stake required per unit of declared capacity, in wei.
    uint256 public immutable stakePerUnit;

    /// @notice Seconds between beginUnbond and withdraw.
    uint64 public immutable unbondingDelay;

    /// @notice Stake required per stage assignment, in wei, on top of capacity * stakePerUnit.
    uint256 public immutable stakePerStage;

    /// @notice The ModelRegistry whose models' stages nodes are assigned to.
    IModelRegistry public immutable modelRegistry;

    /// @notice Largest stakePerStage (2^128 - 1 wei): with at most 2^32 assignments per node the stage stake stays
    /// below 2^160, far from overflowing when added to the capacity stake.
    uint256 public constant MAX_STAKE_PER_STAGE = type(uint128).max;

    /// @notice Largest unbonding delay (365 days): beginUnbond computes block.timestamp + unbondingDelay in uint64,
    /// and a delay near 2^64 would make that overflow and lock every stake for good.
    uint64 public constant MAX_UNBONDING_DELAY = 365 days;

    /// @notice The ContributionLedger (the only slasher); set once.
    address public ledger;

    /// @notice Total wei slashed so far (locked here forever).
    uint256 public totalSlashed;

    mapping(address nodeKey => Node) private _nodes;
    mapping(uint256 modelId => mapping(address nodeKey => StageSlot)) private _nodeStage;
    mapping(uint256 modelId => mapping(address operator => OperatorSlot)) private _operatorStage;
    mapping(address nodeKey => uint32) private _assignments;

    /// @notice The node key is zero.
    error NodeRegistryInvalidNodeKey();
    /// @notice The node is already registered (active or unbonding).
    /// @param nodeKey The node.
    error NodeRegistryAlreadyRegistered(address nodeKey);
    /// @notice The node is not registered.
    /// @param nodeKey The node.
    error NodeRegistryUnknownNode(address nodeKey);
    /// @notice Declared capacity is zero, or so large that capacity * stakePerUnit overflows.
    /// @param capacity The capacity given.
    /// @param maxCapacity The largest capacity accepted.
    error NodeRegistryInvalidCapacity(uint256 capacity, uint256 maxCapacity);
    /// @notice The stake sent is below capacity * stakePerUnit.
    /// @param sent Wei sent.
    /// @param required Wei required.
    error NodeRegistryInsufficientStake(uint256 sent, uint256 required);
    /// @notice The peer-key signature is malformed or not by the node key.
    /// @param nodeKey The node key that had to sign.
    /// @param recovered The signer recovered (zero if none).
    error NodeRegistryInvalidPeerKeySignature(address nodeKey, address recovered);
    /// @notice The caller is not the node's operator.
    /// @param nodeKey The node.
    /// @param caller The caller.
    error NodeRegistryNotOperator(address nodeKey, address caller);
    /// @notice The node is not in the status the call needs.
    /// @param nodeKey The node.
    /// @param status Its current status.
    error NodeRegistryWrongStatus(address nodeKey, Status status);
    /// @notice The unbonding delay has not passed.
    /// @param nodeKey The node.
    /// @param unbondsAt When withdraw becomes possible.
    error NodeRegistryStillUnbonding(address nodeKey, uint64 unbondsAt);
    /// @notice The caller is not the ledger.
    /// @param caller The caller.
    error NodeRegistryNotLedger(address caller);
    /// @notice The ledger is already set.
    /// @param ledger The ledger already set.
    error NodeRegistryLedgerAlreadySet(address ledger);
    /// @notice The ledger address is zero.
    error NodeRegistryInvalidLedger();
    /// @notice The unbonding delay is above MAX_UNBONDING_DELAY.
    /// @param unbondingDelay The delay given.
    /// @param maxUnbondingDelay The largest delay accepted.
    error NodeRegistryInvalidUnbondingDelay(uint64 unbondingDelay, uint64 maxUnbondingDelay);

    /// @notice stakePerStage is above MAX_STAKE_PER_STAGE.
    /// @param stakePerStage The stake per stage given.
    /// @param maxStakePerStage The largest stake per stage accepted.
    error NodeRegistryInvalidStakePerStage(uint256 stakePerStage, uint256 maxStakePerStage);
    /// @notice The model registry address is zero.
    error NodeRegistryInvalidModelRegistry();
    /// @notice The model is unknown or retired: only Proposed and Training models take stage assignments.
    /// @param modelId The model.
    /// @param status Its status in the ModelRegistry (None when unknown).
    error NodeRegistryModelNotOpen(uint256 modelId, IModelRegistry.Status status);
    /// @notice The stage index is not below the model's number of stages.
    /// @param modelId The model.
    /// @param stage The stage given.
    /// @param numStages The model's number of stages.
    error NodeRegistryInvalidStage(uint256 modelId, uint16 stage, uint16 numStages);
    /// @notice The operator already holds another stage of the model (through this or another of its node keys).
    /// @param operator The operator.
    /// @param modelId The model.
    /// @param heldStage The stage the operator holds.
    /// @param stage The stage asked for.
    error NodeRegistryOperatorHoldsOtherStage(address operator, uint256 modelId, uint16 heldStage, uint16 stage);
    /// @notice The node is already assigned to this stage of the model.
    /// @param nodeKey The node.
    /// @param modelId The model.
    /// @param stage The stage.
    error NodeRegistryStageAlreadyAssigned(address nodeKey, uint256 modelId, uint16 stage);
    /// @notice The node's stake (after adding msg.value) does not cover its capacity and all its stage assignments.
    /// @param nodeKey The node.
    /// @param stake The node's stake including msg.value.
    /// @param required capacity * stakePerUnit + assignments * stakePerStage, counting the new assignment.
    error NodeRegistryInsufficientStageStake(address nodeKey, uint256 stake, uint256 required);
    /// @notice The node is not assigned to any stage of the model.
    /// @param nodeKey The node.
    /// @param modelId The model.
    error NodeRegistryNotAssigned(address nodeKey, uint256 modelId);
    /// @notice The node still holds stage assignments; it must leave them before unbonding.
    /// @param nodeKey The node.
    /// @param assignments The number of stages it holds.
    error NodeRegistryStagesAssigned(address nodeKey, uint32 assignments);

    /// @notice A node registered.
    event NodeRegistered(address indexed nodeKey, address indexed operator, uint256 capacity, uint256 stake);
    /// @notice A node began unbonding.
    event UnbondingStarted(address indexed nodeKey, uint64 unbondsAt);
    /// @notice A node withdrew its stake.
    event StakeWithdrawn(address indexed nodeKey, address indexed operator, uint256 amount);
    /// @notice A node was slashed.
    event NodeSlashed(address indexed nodeKey, uint256 amount, bytes32 evidence);
    /// @notice The ledger was set.
    event LedgerSet(address ledger);
    /// @notice A node was assigned to a stage of a model.
    /// @param modelId The model.
    /// @param nodeKey The node.
    /// @param operator The node's operator.
    /// @param stage The stage.
    /// @param stake The node's stake after the assignment (including the value sent with it).
    event StageAssigned(
        uint256 indexed modelId, address indexed nodeKey, address indexed operator, uint16 stage, uint256 stake
    );
    /// @notice A node left its stage of a model.
    /// @param modelId The model.
    /// @param nodeKey The node.
    /// @param operator The node's operator.
    /// @param stage The stage it left.
    event StageLeft(uint256 indexed modelId, address indexed nodeKey, address indexed operator, uint16 stage);

    /// @param admin Holder of DEFAULT_ADMIN_ROLE (can set the ledger once).
    /// @param stakePerUnit_ Wei of stake per unit of capacity.
    /// @param unbondingDelay_ Seconds from beginUnbond to withdraw.
    /// @param stakePerStage_ Wei of stake per stage assignment (at most MAX_STAKE_PER_STAGE).
    /// @param modelRegistry_ The ModelRegistry (non-zero).
    constructor(
        address admin,
        uint256 stakePerUnit_,
        uint64 unbondingDelay_,
        uint256 stakePerStage_,
        IModelRegistry modelRegistry_
    ) EIP712("PMN NodeRegistry", "1") {
        if (unbondingDelay_ > MAX_UNBONDING_DELAY) {
            revert NodeRegistryInvalidUnbondingDelay(unbondingDelay_, MAX_UNBONDING_DELAY);
        }
        if (stakePerStage_ > MAX_STAKE_PER_STAGE) {
            revert NodeRegistryInvalidStakePerStage(stakePerStage_, MAX_STAKE_PER_STAGE);
        }
        if (address(modelRegistry_) == address(0)) revert NodeRegistryInvalidModelRegistry();
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        stakePerUnit = stakePerUnit_;
        unbondingDelay = unbondingDelay_;
        stakePerStage = stakePerStage_;
        modelRegistry = modelRegistry_;
    }

    /// @notice Sets the ContributionLedger once; admin only.
    /// @param ledger_ The ledger address (non-zero).
    function setLedger(address ledger_) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (ledger != address(0)) revert NodeRegistryLedgerAlreadySet(ledger);
        if (ledger_ == address(0)) revert NodeRegistryInvalidLedger();
        ledger = ledger_;
        emit LedgerSet(ledger_);
    }

    /// @notice Registers a node operated by the caller, bonding msg.value as stake.
    /// @param nodeKey Address of the node's peer key.
    /// @param capacity Declared capacity (> 0); msg.value must be >= capacity * stakePerUnit.
    /// @param peerKeySignature EIP-712 Registration(operator=msg.sender, nodeKey, capacity, nonces(nodeKey))
    /// signed by the node key.
    function register(address nodeKey, uint256 capacity, bytes calldata peerKeySignature) external payable {
        if (nodeKey == address(0)) revert NodeRegistryInvalidNodeKey();
        Node storage n = _nodes[nodeKey];
        if (n.status == Status.Active || n.status == Status.Unbonding) revert NodeRegistryAlreadyRegistered(nodeKey);
        uint256 maxCapacity = stakePerUnit == 0 ? type(uint256).max : type(uint256).max / stakePerUnit;
        if (capacity == 0 || capacity > maxCapacity) revert NodeRegistryInvalidCapacity(capacity, maxCapacity);
        uint256 required = capacity * stakePerUnit;
        if (msg.value < required) revert NodeRegistryInsufficientStake(msg.value, required);
        bytes32 digest = _hashTypedDataV4(
            keccak256(abi.encode(REGISTRATION_TYPEHASH, msg.sender, nodeKey, capacity, nonces(nodeKey)))
        );
        (address recovered, ECDSA.RecoverError err, ) = ECDSA.tryRecover(digest, peerKeySignature);
        if (err != ECDSA.RecoverError.NoError || recovered != nodeKey) {
            revert NodeRegistryInvalidPeerKeySignature(nodeKey, recovered);
        }
        _useNonce(nodeKey);
        n.operator = msg.sender;
        n.status = Status.Active;
        n.unbondsAt = 0;
        n.bondedAt = uint64(block.timestamp);
        n.capacity = capacity;
        n.stake = msg.value;
        emit NodeRegistered(nodeKey, msg.sender, capacity, msg.value);
    }

    /// @notice Starts the unbonding delay; operator only. The node stays slashable until it withdraws. The ledger
    /// mints a leaf of this node only for roots whose challenge window closes by `unbondsAt`. A node holding stage
    /// assignments must leave them first (`leaveStage`), so an assigned node is always active and bonded.
    /// @param nodeKey The node.
    function beginUnbond(address nodeKey) external {
        Node storage n = _operatorNode(nodeKey);
        if (n.status != Status.Active) revert NodeRegistryWrongStatus(nodeKey, n.status);
        uint32 assignments = _assignments[nodeKey];
        if (assignments != 0) revert NodeRegistryStagesAssigned(nodeKey, assignments);
        uint64 unbondsAt = uint64(block.timestamp) + unbondingDelay;
        n.status = Status.Unbonding;
        n.unbondsAt = unbondsAt;
        emit UnbondingStarted(nodeKey, unbondsAt);
    }

    /// @notice Returns the remaining stake to the operator after the unbonding delay; operator only.
    /// @param nodeKey The node.
    function withdraw(address nodeKey) external nonReentrant {
        Node storage n = _operatorNode(nodeKey);
        if (n.status != Status.Unbonding) revert NodeRegistryWrongStatus(nodeKey, n.status);
        if (block.timestamp < n.unbondsAt) revert NodeRegistryStillUnbonding(nodeKey, n.unbondsAt);
        uint256 amount = n.stake;
        n.stake = 0;
        n.status = Status.Withdrawn;
        emit StakeWithdrawn(nodeKey, msg.sender, amount);
        Address.sendValue(payable(msg.sender), amount);
    }

    /// @inheritdoc INodeRegistry
    function slash(address nodeKey, uint256 amount, bytes32 evidence) external returns (uint256 slashed) {
        if (msg.sender != ledger) revert NodeRegistryNotLedger(msg.sender);
        Node storage n = _nodes[nodeKey];
        slashed = amount < n.stake ? amount : n.stake;
        n.stake -= slashed;
        totalSlashed += slashed;
        emit NodeSlashed(nodeKey, slashed, evidence);
    }

    /// @notice Assigns an active node to one stage of a model; operator only. msg.value is added to the node's stake
    /// (it is bonded, slashable and returned at withdraw like the rest). The node's stake must then cover
    /// capacity * stakePerUnit + stakePerStage * (its assignments, this one included). The operator may hold only
    /// one stage per model across all its node keys; several of its node keys may serve that same stage. Assigning
    /// a node to the stage it already holds reverts (NodeRegistryStageAlreadyAssigned): nothing is ever counted
    /// twice.
    /// @param nodeKey The node (registered, active, operated by the caller).
    /// @param modelId The model (Proposed or Training).
    /// @param stage The stage (below the model's numStages).
    function assignStage(address nodeKey, uint256 modelId, uint16 stage) external payable {
        Node storage n = _operatorNode(nodeKey);
        if (n.status != Status.Active) revert NodeRegistryWrongStatus(nodeKey, n.status);
        IModelRegistry.Status modelStatus = modelRegistry.statusOf(modelId);
        if (modelStatus != IModelRegistry.Status.Proposed && modelStatus != IModelRegistry.Status.Training) {
            revert NodeRegistryModelNotOpen(modelId, modelStatus);
        }
        uint16 numStages = modelRegistry.numStagesOf(modelId);
        if (stage >= numStages) revert NodeRegistryInvalidStage(modelId, stage, numStages);
        StageSlot storage slot = _nodeStage[modelId][nodeKey];
        if (slot.assigned) {
            if (slot.stage == stage) revert NodeRegistryStageAlreadyAssigned(nodeKey, modelId, stage);
            revert NodeRegistryOperatorHoldsOtherStage(msg.sender, modelId, slot.stage, stage);
        }
        OperatorSlot storage op = _operatorStage[modelId][msg.sender];
        if (op.nodes != 0 && op.stage != stage) {
            revert NodeRegistryOperatorHoldsOtherStage(msg.sender, modelId, op.stage, stage);
        }
        uint32 assignments = _assignments[nodeKey] + 1;
        uint256 stake = n.stake + msg.value;
        uint256 required = _requiredStake(n.capacity, assignments);
        if (stake < required) revert NodeRegistryInsufficientStageStake(nodeKey, stake, required);
        n.stake = stake;
        _assignments[nodeKey] = assignments;
        slot.assigned = true;
        slot.stage = stage;
        op.stage = stage;
        op.nodes += 1;
        emit StageAssigned(modelId, nodeKey, msg.sender, stage, stake);
    }

    /// @notice Removes a node's assignment to its stage of a model; operator only. Works in any model status. The
    /// stake stays bonded (it leaves only through beginUnbond and withdraw).
    /// @param nodeKey The node.
    /// @param modelId The model.
    function leaveStage(address nodeKey, uint256 modelId) external {
        _operatorNode(nodeKey);
        StageSlot storage slot = _nodeStage[modelId][nodeKey];
        if (!slot.assigned) revert NodeRegistryNotAssigned(nodeKey, modelId);
        uint16 stage = slot.stage;
        delete _nodeStage[modelId][nodeKey];
        _assignments[nodeKey] -= 1;
        OperatorSlot storage op = _operatorStage[modelId][msg.sender];
        op.nodes -= 1;
        if (op.nodes == 0) delete _operatorStage[modelId][msg.sender];
        emit StageLeft(modelId, nodeKey, msg.sender, stage);
    }

    /// @notice The stage a node is assigned to in a model, whatever its stake (see `servesStage`).
    /// @param modelId The model.
    /// @param nodeKey The node.
    /// @return assigned Whether the node holds a stage of the model.
    /// @return stage The stage (0 when not assigned).
    function stageOf(uint256 modelId, address nodeKey) external view returns (bool assigned, uint16 stage) {
        StageSlot storage slot = _nodeStage[modelId][nodeKey];
        return (slot.assigned, slot.stage);
    }

    /// @notice The stage an operator holds in a model (through any of its node keys).
    /// @param modelId The model.
    /// @param operator The operator.
    /// @return assigned Whether the operator holds a stage of the model.
    /// @return stage The stage (0 when not assigned).
    function operatorStageOf(uint256 modelId, address operator) external view returns (bool assigned, uint16 stage) {
        OperatorSlot storage op = _operatorStage[modelId][operator];
        return (op.nodes != 0, op.stage);
    }

    /// @notice Whether a node may serve `stage` of a model now: assigned to it, active, and its stake (after any
    /// slashing) still covers its capacity and every stage it holds. What peers should check.
    /// @param modelId The model.
    /// @param nodeKey The node.
    /// @param stage The stage.
    function servesStage(uint256 modelId, address nodeKey, uint16 stage) external view returns (bool) {
        StageSlot storage slot = _nodeStage[modelId][nodeKey];
        Node storage n = _nodes[nodeKey];
        return slot.assigned && slot.stage == stage && n.status == Status.Active &&
            n.stake >= _requiredStake(n.capacity, _assignments[nodeKey]);
    }

    /// @notice The number of stages (over all models) a node holds.
    /// @param nodeKey The node.
    function assignmentsOf(address nodeKey) external view returns (uint32) {
        return _assignments[nodeKey];
    }

    /// @notice The stake a node of `capacity` needs to hold `assignments` stages (type(uint256).max if it overflows).
    /// @param capacity The node's declared capacity.
    /// @param assignments The number of stages.
    function stageStakeRequired(uint256 capacity, uint32 assignments) external view returns (uint256) {
        return _requiredStake(capacity, assignments);
    }

    /// @notice The full record of a node.
    /// @param nodeKey The node.
    function getNode(address nodeKey) external view returns (Node memory) {
        return _nodes[nodeKey];
    }

    /// @inheritdoc INodeRegistry
    function operatorOf(address nodeKey) external view returns (address) {
        return _nodes[nodeKey].operator;
    }

    /// @inheritdoc INodeRegistry
    function bondOf(address nodeKey) external view returns (address operator, uint64 bondedAt, uint64 withdrawableAt) {
        Node storage n = _nodes[nodeKey];
        operator = n.operator;
        bondedAt = n.bondedAt;
        withdrawableAt = n.status == Status.Active ? type(uint64).max : n.unbondsAt;
    }

    /// @inheritdoc INodeRegistry
    function stakeOf(address nodeKey) external view returns (uint256) {
        return _nodes[nodeKey].stake;
    }

    /// @notice The EIP-712 domain separator (for off-chain signers).
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    /// @dev capacity * stakePerUnit fits (checked at register); stakePerStage * assignments < 2^160; their sum
    /// saturates instead of panicking, and a saturated requirement can never be met.
    function _requiredStake(uint256 capacity, uint32 assignments) private view returns (uint256) {
        (bool ok, uint256 required) = Math.tryAdd(capacity * stakePerUnit, stakePerStage * assignments);
        return ok ? required : type(uint256).max;
    }

    function _operatorNode(address nodeKey) private view returns (Node storage n) {
        n = _nodes[nodeKey];
        if (n.status == Status.None) revert NodeRegistryUnknownNode(nodeKey);
        if (n.operator != msg.sender) revert NodeRegistryNotOperator(nodeKey, msg.sender);
    }
}
